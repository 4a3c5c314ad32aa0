"""Helpers shared by the ``moral`` command modules."""

from __future__ import annotations

import json
import sys


def print_json(obj: object) -> None:
    """One JSON document on stdout (dates and paths as strings)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
