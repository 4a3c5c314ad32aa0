"""Helpers shared by the ``moral`` command modules."""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.registry import Registry
    from storage.settings import Settings


def print_json(obj: object) -> None:
    """One JSON document on stdout (dates and paths as strings)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def open_registry(settings: Settings, must_exist: bool = True) -> Registry | None:
    """The data home's registry, opened here: the pipeline's functions are given it. With
    ``must_exist`` a home without one is an error ("run `moral refresh` first"); otherwise None."""
    from storage.registry import Registry

    if not settings.registry_path.exists():
        if must_exist:
            raise FileNotFoundError(f"no registry at {settings.registry_path}: run `moral refresh` first")
        return None
    return Registry.from_settings(settings)


def cli_actor() -> str:
    """Who ran a CLI command, for the audit log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary uids)
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"
