"""Files the pipeline writes beside the registry, written atomically: a reader (the gate, a report,
another process) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = None) -> Path:
    """``obj`` as JSON (values JSON cannot hold, such as paths, as strings), atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=str))
