"""Operations: ``moral promote``, ``moral rollback``, ``moral deploy``, ``moral serve``, ``moral gc``, ``moral backup``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``moral`` parser."""
