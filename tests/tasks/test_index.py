"""Indexing into a real Chroma PersistentClient: deterministic ids, first run kept, retire/restore."""

from __future__ import annotations

import pytest

from storage.vectors import CHUNKS, QA_PAIRS, VectorStore
from tasks.chunking import Page, chunk_pages
from tasks.dedup import embedding_text
from tasks.index import index_chunks, index_qa, restore, retire
from tasks.qa import new_pair
from tasks.text import qa_key

TEXT = (
    "The Quillfeather Q7 weighs 1.8 kg and carries a maximum payload of 2.4 kg. "
    "Its battery lasts 42 minutes in calm weather. Harbor Labs released it in March 2024. "
) * 6


@pytest.fixture
def store(settings, embedder):
    return VectorStore(settings, embedder)


def chunks_of(doc_id: str):
    return chunk_pages(doc_id, [Page(1, TEXT), Page(2, TEXT)], chunk_tokens=40, overlap=8)


def test_index_chunks_is_idempotent_and_keeps_first_run(store):
    chunks = chunks_of("docA")
    meta = {"docA": {"path": "/src/a.pdf", "title": "Q7 spec"}}
    assert index_chunks(store, chunks, meta, "run1") == len(chunks)
    assert index_chunks(store, chunks, meta, "run2") == 0  # re-running is a no-op
    assert store.count(CHUNKS) == len(chunks)
    recs = {r.id: r for r in store.get(CHUNKS, ids=[c.chunk_id for c in chunks])}
    first = recs[chunks[0].chunk_id].metadata
    assert first["run_id"] == "run1" and first["doc_id"] == "docA" and first["path"] == "/src/a.pdf"
    assert first["title"] == "Q7 spec" and first["idx"] == 0 and first["page"] == 1
    assert first["status"] == "active"
    assert {r.metadata["page"] for r in recs.values()} == {1, 2}
    assert recs[chunks[0].chunk_id].text == chunks[0].text
    # retrieval works on the stored embeddings
    hit = store.query(CHUNKS, ["How heavy is the Quillfeather Q7?"], k=1)[0][0]
    assert "1.8 kg" in hit.text


def test_index_adds_only_new_ids_in_a_mixed_batch(store):
    a, b = chunks_of("docA"), chunks_of("docB")
    index_chunks(store, a, {}, "run1")
    assert index_chunks(store, a + b + b[:1], {}, "run2") == len(b)  # repeated id counted once
    runs = {r.metadata["doc_id"]: r.metadata["run_id"] for r in store.get(CHUNKS)}
    assert runs == {"docA": "run1", "docB": "run2"}


def test_index_qa_metadata_and_idempotence(store, embedder):
    pairs = [
        new_pair("What is the maximum payload of the Quillfeather Q7?", "2.4 kg", "c1", "docA", "g", "v"),
        new_pair("How long does the Q7 battery last?", "42 minutes", "c2", "docA", "g", "v"),
    ]
    emb = embedder.encode([embedding_text(p.question, p.answer) for p in pairs])
    assert index_qa(store, pairs, emb, "run1") == 2
    assert index_qa(store, pairs, emb, "run2") == 0
    rec = store.get(QA_PAIRS, ids=[pairs[0].qa_id])[0]
    assert rec.metadata["split"] == pairs[0].split and rec.metadata["run_id"] == "run1"
    assert rec.metadata["answer"] == "2.4 kg" and rec.metadata["qa_key"] == qa_key(
        pairs[0].question, pairs[0].answer
    )
    assert rec.text == embedding_text(pairs[0].question, pairs[0].answer)
    with pytest.raises(ValueError):
        index_qa(store, pairs, emb[:1], "run3")


def test_retire_and_restore(store, embedder):
    a, b = chunks_of("docA"), chunks_of("docB")
    index_chunks(store, a + b, {}, "run1")
    pairs = [new_pair("How long does the Q7 battery last?", "42 minutes", a[0].chunk_id, "docA", "g", "v")]
    index_qa(store, pairs, embedder.encode([embedding_text(pairs[0].question, pairs[0].answer)]), "run1")
    assert retire(store, ["docA"]) == len(a) + 1
    assert retire(store, ["docA"]) == 0  # idempotent
    assert store.count(CHUNKS, where={"status": "active"}) == len(b)
    assert store.count(QA_PAIRS, where={"status": "retired"}) == 1
    hits = store.query(CHUNKS, ["battery"], k=50, where={"status": "active"})[0]
    assert {h.metadata["doc_id"] for h in hits} == {"docB"}
    assert restore(store, ["docA"]) == len(a) + 1
    assert store.count(CHUNKS, where={"status": "active"}) == len(a) + len(b)


def test_reindexing_a_retired_chunk_reactivates_it(store):
    a = chunks_of("docA")
    index_chunks(store, a, {}, "run1")
    retire(store, ["docA"])
    assert index_chunks(store, a, {}, "run2") == 0
    recs = store.get(CHUNKS)
    assert {r.metadata["status"] for r in recs} == {"active"} and {r.metadata["run_id"] for r in recs} == {
        "run1"
    }


def test_index_stage_reactivates_the_vectors_of_a_document_that_comes_back(settings, embedder, tmp_path):
    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage

    src = tmp_path / "src"
    src.mkdir()
    (src / "q7.md").write_text(TEXT)
    (src / "other.md").write_text("Grey herons nest in tall trees near shallow lakes and slow rivers.\n")
    ingest_stage(settings, src, "run-1")
    first = index_stage(settings, "run-1")
    store = VectorStore(settings, embedder)
    n = first.chunks_indexed
    assert n >= 2 and store.count(CHUNKS, {"status": "active"}) == n

    kept = (src / "q7.md").read_bytes()
    (src / "q7.md").unlink()
    ingest_stage(settings, src, "run-2")
    gone = index_stage(settings, "run-2")
    assert gone.retired_vectors == n - 1 and store.count(CHUNKS, {"status": "active"}) == 1
    hits = store.query(CHUNKS, ["How much does the Quillfeather Q7 weigh?"], k=1, where={"status": "active"})
    assert "Quillfeather" not in hits[0][0].text

    (src / "q7-restored.md").write_bytes(kept)  # the same bytes come back under another name
    back = ingest_stage(settings, src, "run-3")
    assert back.documents_renamed == [str(src / "q7-restored.md")] and back.chunks_added == 0
    again = index_stage(settings, "run-3")
    assert again.chunks_indexed == 0 and again.restored_vectors == n - 1  # nothing re-embedded
    assert store.count(CHUNKS, {"status": "active"}) == n
    hits = store.query(CHUNKS, ["How much does the Quillfeather Q7 weigh?"], k=1, where={"status": "active"})
    assert "Quillfeather" in hits[0][0].text
    assert index_stage(settings, "run-4").restored_vectors == 0  # idempotent


def test_pairs_indexed_under_the_old_normalisation_are_rekeyed_once(store, embedder):
    from storage.text import KEY_VERSION
    from tasks.index import migrate_qa_keys

    pairs = [
        new_pair("What is the maximum payload of the Q7?", "2.4 kg", "c1", "docA", "g", "v"),
        new_pair("How long does the Q7 battery last?", "42 minutes", "c2", "docA", "g", "v"),
    ]
    # As an older release indexed them: another dedup key, no fact id, no key version.
    texts = [embedding_text(p.question, p.answer) for p in pairs]
    metas = [{"doc_id": p.doc_id, "split": p.split, "qa_key": "old-key", "status": "active"} for p in pairs]
    store.upsert(QA_PAIRS, [p.qa_id for p in pairs], texts, metas, embeddings=embedder.encode(texts))
    present = {p.qa_id for p in pairs}
    assert migrate_qa_keys(store, pairs, present) == 2
    for p in pairs:
        meta = store.get(QA_PAIRS, ids=[p.qa_id])[0].metadata
        assert (
            meta["qa_key"] == qa_key(p.question, p.answer)
            and meta["fact_id"] == p.fact_id
            and meta["key_version"] == KEY_VERSION
        )
    assert migrate_qa_keys(store, pairs, present) == 0  # nothing old is left: no work the second time


def test_pairs_close_to_a_held_out_question_are_excluded_before_indexing(settings, embedder, tmp_path):
    """MORAL_HOLDOUT_QUESTIONS: a generated wording close to a hand-written question (either paraphrase
    threshold) is excluded with its reason and never indexed or trained; a far one is kept."""
    from storage.records import QAPair
    from storage.registry import Registry
    from tasks.stages.index import index_stage, load_holdout_questions
    from tasks.stages.ingest import ingest_stage

    src = tmp_path / "src"
    src.mkdir()
    (src / "q7.md").write_text(TEXT)
    held = tmp_path / "held.jsonl"
    held.write_text(
        '{"question": "How much weight can the Quillfeather Q7 drone carry?", "answer": "2.4 kg"}\n'
    )
    assert load_holdout_questions(held) == ["How much weight can the Quillfeather Q7 drone carry?"]
    s = settings.model_copy(update={"holdout_questions": held})
    ingest_stage(s, src, "run-1")
    reg = Registry.from_settings(s)
    chunk = reg.chunks()[0]
    close = QAPair.new(
        chunk.chunk_id, chunk.doc_id, "How much weight can the Quillfeather Q7 carry?", "2.4 kg", "train"
    )
    far = QAPair.new(
        chunk.chunk_id, chunk.doc_id, "What is the maximum payload of the Quillfeather Q7?", "2.4 kg", "train"
    )
    other = QAPair.new(chunk.chunk_id, chunk.doc_id, "How long does the battery last?", "42 minutes", "train")
    reg.add_qa_pairs([close, far, other], run_id="run-1")
    out = index_stage(s, "run-1")
    assert out.qa_excluded_near_holdout == 1
    assert [p.qa_id for p in reg.qa_pairs(status="excluded")] == [close.qa_id]
    store = VectorStore(s, embedder)
    assert close.qa_id not in set(store.ids(QA_PAIRS, ids=[close.qa_id, far.qa_id, other.qa_id]))
    # far from the held-out question: indexed (trained, or held out as a paraphrase), not excluded
    assert far.qa_id in set(store.ids(QA_PAIRS, ids=[far.qa_id]))
    (event,) = reg.events(kind="qa.excluded")  # audited, with the reason and the actor
    assert event.actor == "index" and event.detail["reason"].startswith("close to a held-out question of")
    assert event.detail["ids"] == [close.qa_id]
    held.write_text("not json but a question?\n{broken\n")
    with pytest.raises(ValueError, match="held.jsonl:2"):
        load_holdout_questions(held)


def test_the_held_out_question_distance_leaves_out_the_document_subject(settings, embedder, tmp_path):
    """Every wording of a fact names the document's subject, and so does the hand-written question:
    the distance is taken without it, as the paraphrase split's is, so a far wording is still taught."""
    from storage.records import QAPair
    from storage.registry import Registry
    from tasks.chunking import document_subjects
    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage

    src = tmp_path / "src"
    src.mkdir()
    (src / "orbit.md").write_text(
        "# Lumenvale Orbit 5.2 release notes\n\nLumenvale Orbit is a help desk. The default retention "
        "period for closed tickets is now 540 days.\n"
    )
    held = tmp_path / "held.jsonl"
    held.write_text('{"question": "How long are closed tickets kept in Lumenvale Orbit 5.2?"}\n')
    s = settings.model_copy(update={"holdout_questions": held})
    ingest_stage(s, src, "run-1")
    reg = Registry.from_settings(s)
    chunk = reg.chunks()[0]
    assert document_subjects(reg, [chunk.doc_id]) == {chunk.doc_id: "Lumenvale Orbit 5.2"}
    new = lambda q: QAPair.new(chunk.chunk_id, chunk.doc_id, q, "540 days", "train")  # noqa: E731
    close = new("For how long are closed tickets kept in Lumenvale Orbit 5.2?")
    far = new("What is the default retention period for closed tickets in Lumenvale Orbit 5.2?")
    reg.add_qa_pairs([close, far], run_id="run-1")
    assert index_stage(s, "run-1").qa_excluded_near_holdout == 1
    assert [p.qa_id for p in reg.qa_pairs(status="excluded")] == [close.qa_id]


def test_a_missing_holdout_questions_file_is_refused_at_start(tmp_path):
    """Checked when the settings are read, before any LLM call: nothing would be kept out otherwise."""
    from pydantic import ValidationError

    from storage.settings import Settings

    with pytest.raises(ValidationError, match="no such file"):
        Settings(home=tmp_path / "home", holdout_questions=tmp_path / "missing.jsonl")
    (tmp_path / "q.txt").write_text("How much weight can the Q7 carry?\n")
    s = Settings(home=tmp_path / "home", holdout_questions=tmp_path / "q.txt")
    assert s.holdout_questions == (tmp_path / "q.txt").resolve()
