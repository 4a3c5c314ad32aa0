"""Evaluation commands: ``moral eval``, ``moral report``, ``moral compare``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``moral`` parser."""
