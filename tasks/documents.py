"""A recorded document's data, found by its path and purged for good (``moral docs purge``), and
pairs excluded by an operator (``moral qa exclude``)."""

from __future__ import annotations

from pathlib import Path

from storage.records import Document
from storage.registry import Registry
from storage.settings import Settings


def match_documents(reg: Registry, path: str) -> list[Document]:
    """Documents (any status, every content a path has had) recorded at ``path``.

    Registry paths are absolute; a relative argument is tried against the working directory
    (with and without resolving symlinks), then as a path suffix (``notes/a.md``) when that is unique
    to one file.
    """
    raw = Path(path).expanduser()
    candidates = {path, str(raw.absolute()), str(raw.resolve())}
    docs = reg.documents()
    exact = [d for d in docs if d.path in candidates]
    if exact:
        return exact
    suffix = "/" + raw.as_posix().lstrip("./")
    by_suffix = [d for d in docs if d.path.endswith(suffix)]
    if len({d.path for d in by_suffix}) > 1:
        listed = ", ".join(sorted({d.path for d in by_suffix})[:5])
        raise ValueError(f"{path} matches several documents ({listed}); give the full path")
    return by_suffix


def exclude_pairs(
    reg: Registry, settings: Settings, qa_ids: list[str], reason: str, actor: str | None = "cli"
) -> int:
    """Exclude pairs from training, replay and evaluation (``moral qa exclude``) in both stores: the
    index first (a failure there changes nothing in the registry, and repeating is harmless), then the
    registry (unknown ids refused). Returns how many pairs the registry newly excluded."""
    from storage.vectors import VectorStore
    from tasks.index import exclude

    exclude(VectorStore(settings), qa_ids)
    return reg.exclude_pairs(qa_ids, reason, actor=actor, strict=True)


def purge_document(reg: Registry, settings: Settings, path: str) -> dict:
    """Delete everything recorded for the document at ``path``: its vectors first (a failure there
    leaves the registry intact, so the purge can simply be repeated), then chunks, pairs, failures,
    quarantine entries and its LLM cache rows in one registry transaction (one audit event).

    Cache rows are keyed by chunk text and document subject; a row that another document would
    read too (the same text under the same subject, or with none) stays, since that document's
    pairs came from the same reply.
    """
    from storage.vectors import CHUNKS, QA_PAIRS, VectorStore
    from tasks.chunking import document_subjects
    from tasks.qa import cache_keys_ever

    docs = match_documents(reg, path)
    if not docs:
        raise ValueError(f"no document recorded at {path} (see `moral qa list --json` for paths)")
    doc_ids = sorted({d.doc_id for d in docs})
    texts = {c.text for doc_id in doc_ids for c in reg.chunks(doc_id=doc_id, status=None)}
    elsewhere = reg.texts_used_elsewhere(texts, doc_ids)
    # Replies are keyed with the document's subject too, named from a first chunk (any version's).
    subjects = set(document_subjects(reg, doc_ids, status=None).values())
    others = document_subjects(reg, sorted({d for ids in elsewhere.values() for d in ids}), status=None)
    models = reg.cache_models()
    keys = {
        k
        for model, version in models
        for text in texts
        for k in cache_keys_ever(text, model or "", version or "", subjects)
    }
    keys -= {
        k
        for model, version in models
        for text, ids in elsewhere.items()
        for k in cache_keys_ever(text, model or "", version or "", {others.get(d) for d in ids})
    }
    keys = sorted(keys)
    store = VectorStore(settings)
    where = {"doc_id": {"$in": doc_ids}}
    vectors = store.count(CHUNKS, where) + store.count(QA_PAIRS, where)
    for collection in (CHUNKS, QA_PAIRS):
        store.delete(collection, where=where)
    counts = reg.purge_documents(doc_ids, keys, actor="cli")
    still_there = sorted({d.path for d in docs if Path(d.path).exists()})
    return {"paths": sorted({d.path for d in docs}), "doc_ids": doc_ids, "vectors": vectors, **counts,
            "still_in_source": still_there}  # fmt: skip
