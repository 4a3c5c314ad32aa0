"""Answering questions with the champion adapter (or a named version, or the base model)."""

from __future__ import annotations

from pathlib import Path

from storage.registry import Registry
from storage.settings import Settings, get_settings


def load_answering_model(settings: Settings, version: int | str | None = None):
    """(model, tokenizer, version name or None): the named version, else the champion, else the base model."""
    from moe.base_model import load_base_model
    from storage.artifacts import AdapterStore
    from tasks.stages import base_model_identity

    base_path, identity = base_model_identity(settings)
    model, tokenizer = load_base_model(base_path)
    reg = Registry.from_settings(settings)
    if version is None:
        champion = reg.champion() if settings.registry_path.exists() else None
        if champion is None:
            return model, tokenizer, None
        version = champion
    v = reg.get_version(version)
    if v.base_model_sha256 and v.base_model_sha256 != identity["sha256"]:
        raise RuntimeError(f"{v.name} was trained on another base model; refusing to load it")
    uri = Path(v.artifact_uri)
    AdapterStore(uri.parent).verify(uri.name, v.artifact_sha256)
    from tasks.evaluate import load_adapter

    return load_adapter(model, uri), tokenizer, v.name


def answer_question(
    question: str, version: int | str | None = None, open_book: bool = False, settings: Settings | None = None
) -> dict:
    from moe.infer import generate_answers

    settings = settings or get_settings()
    model, tokenizer, name = load_answering_model(settings, version)
    sources: list[dict] = []
    context = None
    if open_book:
        from storage.vectors import CHUNKS, VectorStore

        hits = VectorStore(settings).query(CHUNKS, [question], k=3, where={"status": "active"})[0]
        context = "\n\n".join(h.text for h in hits)
        sources = [{"id": h.id, "path": h.metadata.get("path"), "similarity": h.similarity} for h in hits]
    answer = generate_answers(
        model, tokenizer, [question], contexts=[context] if open_book else None, max_new_tokens=64
    )[0]
    return {
        "question": question,
        "answer": answer,
        "version": name,
        "open_book": open_book,
        "sources": sources,
    }
