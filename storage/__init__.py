"""Storage layer: settings, the DuckDB registry, Chroma vectors and adapter artifacts.

Knows nothing of Prefect or torch models (the embedding model behind Chroma is the one exception).
Names are imported lazily so ``import storage`` stays cheap (chromadb and torch load only when used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Settings": "storage.settings",
    "get_settings": "storage.settings",
    "apply_runtime_env": "storage.settings",
    "Registry": "storage.registry",
    "RegistryError": "storage.records",
    "parse_version": "storage.records",
    "format_version": "storage.records",
    "Embedder": "storage.vectors",
    "VectorStore": "storage.vectors",
    "AdapterStore": "storage.artifacts",
    "ArtifactError": "storage.artifacts",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
