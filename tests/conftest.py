"""Shared fixtures.  The offline environment is set at import time, before any test module imports
transformers, sentence-transformers or chromadb (a hub look-up would otherwise retry for ~47 s)."""

from __future__ import annotations

import os

from storage.settings import OFFLINE_ENV

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402

from storage.settings import Settings, get_settings  # noqa: E402
from tests.corpus import copy_core  # noqa: E402
from tests.tasks.llm_server import LLMServer  # noqa: E402

if TYPE_CHECKING:
    from storage.vectors import Embedder

#: Converted base models are cached machine-wide and shared by every test (converting takes seconds).
DEFAULT_MODEL_CACHE = Path("~/.cache/moral-refresh/models").expanduser()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings with a fresh data home under ``tmp_path``; the model cache stays machine-wide.

    Other ``MORAL_*`` variables from the caller's shell are cleared so a test never talks to a
    real Chroma server or LLM endpoint by accident.
    """
    for key in list(os.environ):
        if key.startswith("MORAL_") and key != "MORAL_MODEL_CACHE":
            monkeypatch.delenv(key)
    monkeypatch.setenv("MORAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MORAL_MODEL_CACHE", os.environ.get("MORAL_MODEL_CACHE", str(DEFAULT_MODEL_CACHE)))
    get_settings.cache_clear()
    value = Settings()
    value.ensure_dirs()
    yield value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The bundled all-MiniLM-L6-v2, loaded once for the whole session."""
    from storage.vectors import Embedder

    model = Embedder()
    _ = model.dimension  # load now, so the first test using it is not charged for the load
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a byte-level tokenizer, saved like any local causal-LM directory."""
    from tests.moe.tiny import save_tiny_base

    path = tmp_path_factory.mktemp("tiny-base")
    save_tiny_base(path)
    return path


# Flow, CLI and server tests: the Prefect test harness, the loopback LLM endpoint, a source folder.
@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def llm_endpoint() -> Iterator[LLMServer]:
    server = LLMServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    """The example corpus plus one corrupt PDF, in a folder of its own."""
    src = copy_core(tmp_path / "docs")
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ntruncated")
    return src
