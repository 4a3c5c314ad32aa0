"""Looking at the data before training: ``moral qa``, ``moral quarantine``, ``moral docs``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``moral`` parser."""
