"""Where a version's files live in the data home, besides its adapter: one function a file kind.

The directories themselves are :class:`storage.settings.Settings` properties (``evaluations_dir``,
``training_dir``, ``bank_dir``, ``compare_dir``, ``reports_dir``)."""

from __future__ import annotations

from pathlib import Path

from storage.settings import Settings


def scores_path(settings: Settings, version: int) -> Path:
    """The evaluate stage's saved scores, items and predictions of ``version``."""
    return settings.evaluations_dir / f"v{version}.json"


def training_log_path(settings: Settings, version: int) -> Path:
    """The loss curve and router statistics of ``version``'s training."""
    return settings.training_dir / f"v{version}.json"


def selection_path(settings: Settings, version: int) -> Path:
    """Which bank experts initialised ``version``, and why."""
    return settings.bank_dir / f"v{version}-selection.json"


def compare_path(settings: Settings, version: int) -> Path:
    """``moral compare``'s MoRAL-vs-LoRA result for ``version``."""
    return settings.compare_dir / f"v{version}.json"


def plots_dir(settings: Settings, version: int) -> Path:
    """The PNG plots of ``version``'s report."""
    return settings.reports_dir / f"v{version}"
