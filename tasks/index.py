"""Index stage: chunks (open-book retrieval) and QA pairs (dedup, replay) into the vector store.

Ids are the deterministic chunk_id / qa_id, so re-running is a no-op. Only ids not yet present are
written, which keeps the `run_id` of the run that first added a record. Records of retired
documents are kept but flagged `status=retired` (queries filter on `status=active`), so a restored
document comes back without re-embedding anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from storage.text import KEY_VERSION
from tasks.dedup import embedding_text
from tasks.text import qa_key

CHUNKS = "chunks"  # storage.vectors.CHUNKS
QA_PAIRS = "qa_pairs"  # storage.vectors.QA_PAIRS
_IN_BATCH = 500  # doc ids per Chroma `$in` filter


def _present(store: Any, collection: str, ids: Sequence[str]) -> dict[str, dict]:
    """id -> metadata of the given ids that the collection already holds (batched by the store)."""
    return {rec.id: rec.metadata for rec in store.get(collection, ids=list(ids))} if ids else {}


def _add_new(
    store: Any,
    collection: str,
    ids: list[str],
    texts: list[str],
    metadatas: list[dict[str, Any]],
    embeddings: np.ndarray | None,
) -> int:
    """Upsert only the ids not present yet; reactivate present ones that were retired."""
    first = {id_: i for i, id_ in reversed(list(enumerate(ids)))}  # first occurrence of each id
    present = _present(store, collection, list(first))
    retired = [id_ for id_, meta in present.items() if meta.get("status") == "retired"]
    if retired:
        store.set_metadata(collection, retired, {"status": "active"})
    rows = [i for id_, i in first.items() if id_ not in present]
    if not rows:
        return 0
    store.upsert(
        collection,
        [ids[i] for i in rows],
        [texts[i] for i in rows],
        [metadatas[i] for i in rows],
        embeddings=None if embeddings is None else np.asarray(embeddings)[rows],
    )
    return len(rows)


def index_chunks(
    store: Any,
    chunks: Sequence[Any],
    doc_meta: Mapping[str, Mapping[str, Any]],
    run_id: str,
    embeddings: np.ndarray | None = None,
) -> int:
    """Add chunks (chunk_id, doc_id, idx, page, text, n_tokens) with their document's path/title;
    embeddings are computed by the store when not given. Returns how many were newly added."""
    metas = []
    for c in chunks:
        doc = doc_meta.get(c.doc_id, {})
        metas.append(
            {
                "doc_id": c.doc_id,
                "path": doc.get("path"),
                "title": doc.get("title"),
                "page": getattr(c, "page", None),
                "idx": c.idx,
                "n_tokens": getattr(c, "n_tokens", None),
                "run_id": run_id,
                "status": "active",
            }
        )
    return _add_new(store, CHUNKS, [c.chunk_id for c in chunks], [c.text for c in chunks], metas, embeddings)


def index_qa(store: Any, pairs: Sequence[Any], embeddings: np.ndarray, run_id: str) -> int:
    """Add QA pairs with the embeddings dedup used (`embedding_text` of question + answer).
    Question, answer and the exact-dedup key go into the metadata for later dedup runs."""
    if len(embeddings) != len(pairs):
        raise ValueError(f"{len(embeddings)} embeddings for {len(pairs)} pairs")
    metas = [
        {
            "doc_id": p.doc_id,
            "chunk_id": p.chunk_id,
            "split": p.split,
            "question": p.question,
            "answer": p.answer,
            "qa_key": qa_key(p.question, p.answer),
            "fact_id": p.fact_id,
            "key_version": KEY_VERSION,
            "generator": getattr(p, "generator", None),
            "prompt_version": getattr(p, "prompt_version", None),
            "run_id": run_id,
            "status": "active",
        }
        for p in pairs
    ]
    texts = [embedding_text(p.question, p.answer) for p in pairs]
    return _add_new(store, QA_PAIRS, [p.qa_id for p in pairs], texts, metas, embeddings)


def qa_key_updates(pairs: Sequence[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The metadata that indexed pairs keyed under an older normalisation need (ids, updates)."""
    ids = [p.qa_id for p in pairs]
    metas = [
        {
            "qa_key": qa_key(p.question, p.answer),
            "fact_id": p.fact_id,
            "split": p.split,
            "key_version": KEY_VERSION,
        }
        for p in pairs
    ]
    return ids, metas


def migrate_qa_keys(store: Any, pairs: Sequence[Any], present: set[str]) -> int:
    """Re-key indexed pairs written before ``storage.text.KEY_VERSION`` (their dedup key and fact id);
    returns how many records changed. Cheap when nothing is old: one id lookup."""
    current = set(store.ids(QA_PAIRS, where={"key_version": KEY_VERSION})) if present else set()
    old = [p for p in pairs if p.qa_id in present and p.qa_id not in current]
    if not old:
        return 0
    ids, metas = qa_key_updates(old)
    return store.update_metadatas(QA_PAIRS, ids, metas)


def set_status(store: Any, doc_ids: Sequence[str], status: str) -> int:
    """Flag every chunk and pair of these documents; returns how many records changed."""
    ids = sorted(set(doc_ids))
    other = "active" if status == "retired" else "retired"
    changed = 0
    for collection in (CHUNKS, QA_PAIRS):
        for start in range(0, len(ids), _IN_BATCH):
            where = {"$and": [{"doc_id": {"$in": ids[start : start + _IN_BATCH]}}, {"status": other}]}
            changed += store.set_metadata(collection, None, {"status": status}, where=where)
    return changed


def retire(store: Any, doc_ids: Sequence[str]) -> int:
    """Mark the documents' chunks and pairs retired (idempotent: already retired ones are not counted)."""
    return set_status(store, doc_ids, "retired")


def restore(store: Any, doc_ids: Sequence[str]) -> int:
    """Undo `retire` for documents that came back (same bytes, same ids)."""
    return set_status(store, doc_ids, "active")


def flag_pairs(store: Any, qa_ids: Sequence[str], status: str) -> int:
    """Flag these pairs ``status`` in the index (those not flagged so already); returns how many
    records changed.  Dedup matches active pairs only."""
    ids = sorted(set(qa_ids))
    changed = 0
    for start in range(0, len(ids), _IN_BATCH):
        changed += store.set_metadata(
            QA_PAIRS, ids[start : start + _IN_BATCH], {"status": status}, where={"status": {"$ne": status}}
        )
    return changed


def exclude(store: Any, qa_ids: Sequence[str]) -> int:
    """Flag these pairs ``excluded`` in the index, as the registry has them: dedup matches active
    pairs only, so a new pair like an excluded one is no longer dropped as its duplicate. A retired
    document's restore leaves them excluded. Returns how many records changed."""
    return flag_pairs(store, qa_ids, "excluded")


def sync_superseded(store: Any, superseded: Sequence[str], status_of: Any) -> int:
    """Flag ``superseded`` pairs (replaced by ``moral qa regenerate``) so in the index, and give
    pairs flagged so that a later regeneration brought back their registry status again
    (``status_of(ids) -> {qa_id: status}``).  A document's retire/restore leaves the flag alone.
    Returns how many records changed."""
    changed = flag_pairs(store, superseded, "superseded")
    gone = set(superseded)
    flagged = [i for i in store.ids(QA_PAIRS, where={"status": "superseded"}) if i not in gone]
    by_status: dict[str, list[str]] = {}
    for qa_id, status in (status_of(flagged) if flagged else {}).items():
        if status != "superseded":
            by_status.setdefault(status, []).append(qa_id)
    for status, ids in sorted(by_status.items()):
        changed += flag_pairs(store, ids, status)
    return changed
