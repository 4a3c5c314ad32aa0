"""A real, verifiable adapter directory for tests that need a version the registry may make champion
(every way to the champion alias verifies the files against the recorded checksum)."""

from __future__ import annotations

import uuid
from pathlib import Path

from storage.artifacts import AdapterStore


def adapter_files(root: Path, content: str | None = None) -> dict[str, str]:
    """``artifact_uri`` / ``artifact_sha256`` keyword arguments for ``Registry.create_version``: a small
    adapter directory written atomically under ``root`` with its checksum manifest."""
    name = uuid.uuid4().hex[:12]
    info = AdapterStore(root).write(
        name, lambda d: (d / "adapter_config.json").write_text(content or f'{{"id": "{name}"}}\n')
    )
    return {"artifact_uri": info.uri, "artifact_sha256": info.sha256}
