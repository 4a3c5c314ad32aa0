"""Dedup with the real bundled embedding model, within a batch and against a real Chroma index."""

from __future__ import annotations

import time

import numpy as np
import pytest

from storage.vectors import QA_PAIRS, VectorStore
from tasks.dedup import answers_agree, dedup_pairs, embedding_text
from tasks.index import index_qa
from tasks.qa import QAPair, new_pair

THRESHOLD = 0.9


def pair(q: str, a: str, chunk: str = "c1", doc: str = "d1") -> QAPair:
    return new_pair(q, a, chunk, doc, "test", "v")


def embed(embedder, pairs):
    return embedder.encode([embedding_text(p.question, p.answer) for p in pairs])


@pytest.fixture
def store(settings, embedder):
    return VectorStore(settings, embedder)


def test_answers_agree():
    assert answers_agree("2.4 kg", "2.4 kg.")
    assert answers_agree("2.4 kg", "2.4 kilograms")
    assert answers_agree("Harbor Labs", "Harbor Labs Inc")
    assert not answers_agree("2.4 kg", "3.1 kg")
    assert not answers_agree("Oslo", "Bergen")


def test_exact_duplicates_within_batch(embedder):
    pairs = [
        pair("What is the maximum payload of the Q7?", "2.4 kg", "c1"),
        pair("what is the maximum payload of the Q7", "2.4 KG", "c2"),  # same after normalisation
        pair("What is the maximum payload of the Q7?", "3.1 kg", "c3"),  # same question, other answer
    ]
    res = dedup_pairs(pairs, embed(embedder, pairs), None, THRESHOLD)
    assert [d.kind for d in res.duplicates] == ["exact"]
    dropped = res.duplicates[0]
    assert {dropped.qa_id, dropped.duplicate_of} == {pairs[0].qa_id, pairs[1].qa_id}
    assert pairs[2] in res.kept and len(res.kept) == 2
    assert res.kept_indices == [i for i, p in enumerate(pairs) if p in res.kept]


def test_semantic_duplicates_within_batch_keep_best_grounded(embedder):
    chunk_a = "The Quillfeather Q7 drone carries a maximum payload of 2.4 kg."
    chunk_b = "Payload (kg): up to 2.4 for the Q7 drone."  # answer tokens present, not contiguous
    pairs = [
        pair("What is the maximum payload of the Q7?", "2.4 kg", "cb", doc="d2"),  # another document
        pair("What is the maximum payload that the Quillfeather Q7 drone can carry?", "2.4 kg", "ca"),
        pair("Who designed the Quillfeather Q7?", "Ingrid Halvorsen", "cc"),
    ]
    emb = embed(embedder, pairs)
    sim = float(emb[0] @ emb[1])
    assert sim > 0.8
    res = dedup_pairs(
        pairs,
        emb,
        None,
        min(THRESHOLD, sim - 0.01),
        chunk_texts={"ca": chunk_a, "cb": chunk_b, "cc": "Ingrid Halvorsen designed it."},
    )
    assert res.duplicates == [(pairs[0].qa_id, pairs[1].qa_id, "semantic", pytest.approx(sim, abs=1e-4))]
    assert res.kept == [pairs[1], pairs[2]]  # the better grounded pair wins despite its longer question


def test_same_question_different_answer_not_semantic_duplicate(embedder):
    pairs = [
        pair("What is the maximum payload of the Quillfeather Q7?", "2.4 kg"),
        pair("What is the maximum payload of the Quillfeather Q7?", "3.1 kg", "c2"),
    ]
    emb = embed(embedder, pairs)
    assert float(emb[0] @ emb[1]) > THRESHOLD  # the embedding alone would call them duplicates
    res = dedup_pairs(pairs, emb, None, THRESHOLD)
    assert not res.duplicates and len(res.kept) == 2


def test_deterministic_regardless_of_input_order(embedder):
    pairs = [
        pair("What is the maximum payload of the Q7?", "2.4 kg", "c1", "d1"),  # three documents
        pair("What's the max payload of the Q7?", "2.4 kg", "c2", "d2"),
        pair("What is the Q7's maximum payload?", "2.4 kg", "c3", "d3"),
    ]
    emb = embed(embedder, pairs)
    a = dedup_pairs(pairs, emb, None, 0.8)
    b = dedup_pairs(pairs[::-1], emb[::-1], None, 0.8)
    assert {p.qa_id for p in a.kept} == {p.qa_id for p in b.kept} and len(a.kept) == 1
    assert sorted(a.duplicates) == sorted(b.duplicates)


def test_against_real_chroma_index(store, embedder):
    indexed = [
        pair("What is the maximum payload of the Quillfeather Q7?", "2.4 kg", "old1", "dold"),
        pair("How long does the Q7 battery last?", "42 minutes", "old2", "dold"),
    ]
    assert index_qa(store, indexed, embed(embedder, indexed), "run1") == 2
    new = [
        pair("what is the maximum payload of the quillfeather q7", "2.4 kg", "new1", "dnew"),  # exact
        pair("How many minutes does the battery of the Q7 last?", "42 minutes", "new2", "dnew"),  # semantic
        pair("How long does the Q7 battery last?", "55 minutes", "new3", "dnew"),  # other answer: keep
        pair("Who designed the Quillfeather Q7?", "Ingrid Halvorsen", "new4", "dnew"),  # new fact
    ]
    emb = embed(embedder, new)
    hit = store.query(QA_PAIRS, emb[1:2], k=1)[0][0]
    threshold = min(THRESHOLD, hit.similarity - 0.01)
    res = dedup_pairs(new, emb, store, threshold)
    kinds = {d.qa_id: (d.kind, d.duplicate_of) for d in res.duplicates}
    assert kinds[new[0].qa_id] == ("exact", indexed[0].qa_id)
    assert kinds[new[1].qa_id] == ("semantic", indexed[1].qa_id)
    assert {p.qa_id for p in res.kept} == {new[2].qa_id, new[3].qa_id}


def test_retired_index_entries_do_not_block(store, embedder):
    from tasks.index import retire

    old = [pair("What is the maximum payload of the Quillfeather Q7?", "2.4 kg", "old1", "dold")]
    index_qa(store, old, embed(embedder, old), "run1")
    retire(store, ["dold"])
    new = [pair("What is the maximum payload of the Quillfeather Q7?", "2.4 kg", "new1", "dnew")]
    res = dedup_pairs(new, embed(embedder, new), store, THRESHOLD)
    assert res.kept == new and not res.duplicates


def test_pairs_already_in_index_are_not_their_own_duplicates(store, embedder):
    pairs = [pair("How long does the Q7 battery last?", "42 minutes")]
    emb = embed(embedder, pairs)
    index_qa(store, pairs, emb, "run1")
    res = dedup_pairs(pairs, emb, store, THRESHOLD)
    assert res.kept == pairs


def test_blocked_within_batch_scales():
    # 6,000 synthetic pairs, 10 copies of each of 600 directions: blocked product, no n x n matrix.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(600, 384)).astype(np.float32)
    emb = np.repeat(base, 10, axis=0) + rng.normal(scale=0.01, size=(6000, 384)).astype(np.float32)
    pairs = [
        pair(f"What is item {i // 10} number {i}?", f"answer {i // 10}", f"c{i}", f"d{i}")
        for i in range(6000)
    ]
    start = time.monotonic()
    res = dedup_pairs(pairs, emb, None, 0.95, block=512)
    assert len(res.kept) == 600 and len(res.duplicates) == 5400
    assert time.monotonic() - start < 20


def test_rewordings_from_the_same_chunk_are_variants_not_duplicates(store, embedder):
    # The QA generator asks each fact twice on purpose: one wording may be trained on while the
    # other is held out. Near-identical wordings of the same chunk must both survive; the same
    # wording from another chunk is still a duplicate, in the batch and against the index.
    twins = [
        pair("Who chaired the Remote Work Committee?", "Anand Okereke", "c1"),
        pair("Which person chaired the Remote Work Committee?", "Anand Okereke", "c1"),
    ]
    emb = embed(embedder, twins)
    assert float(emb[0] @ emb[1]) > THRESHOLD
    res = dedup_pairs(twins, emb, None, THRESHOLD)
    assert not res.duplicates and len(res.kept) == 2

    index_qa(store, twins, emb, "run-1")
    again = [pair("Which person chaired the Remote Work Committee?", "Anand Okereke", "c9")]
    res = dedup_pairs(again, embed(embedder, again), store, THRESHOLD)
    assert [d.kind for d in res.duplicates] == ["exact"]  # same normalised question + answer


def test_retired_nearest_neighbours_do_not_hide_an_active_duplicate(store):
    # The index is queried without a metadata filter (fast); retired hits are skipped in Python and a
    # row whose close hits were all unusable is asked again with the filter.
    from tasks.index import retire

    rng = np.random.default_rng(0)

    def unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    base = unit(rng.standard_normal(384))

    def near(eps: float) -> np.ndarray:  # cosine to `base` about 1 / sqrt(1 + eps^2)
        return unit(base + eps * unit(rng.standard_normal(384)))

    retired = [
        pair(f"What payload does unit {i} of the Q7 carry?", "2.4 kg", f"c{i}", "old") for i in range(6)
    ]
    index_qa(store, retired, np.stack([near(0.01) for _ in retired]), "r1")
    active = pair("What payload does the Q7 carry?", "2.4 kg", "c-live", "live")
    index_qa(store, [active], near(0.1)[None, :], "r1")
    assert retire(store, ["old"]) == 6

    new = pair("How heavy a payload can the Q7 lift?", "2.4 kg", "c-new", "new")
    res = dedup_pairs([new], base[None, :], store, THRESHOLD)
    assert [(d.qa_id, d.duplicate_of, d.kind) for d in res.duplicates] == [
        (new.qa_id, active.qa_id, "semantic")
    ]
    assert res.duplicates[0].similarity > 0.99 and res.kept == []


def test_wordings_of_one_fact_from_overlapping_chunks_are_variants(embedder):
    """Overlapping chunks ask one fact (same document, same answer: one ``fact_id``) in near wordings:
    each is another wording to learn, not a duplicate; an exact copy still is."""
    pairs = [
        pair("What is the maximum payload of the Q7?", "2.4 kg", "c1"),
        pair("What is the highest payload of the Q7?", "2.4 kg", "c2"),
        pair("What is the maximum payload of the Q7?", "2.4 kg", "c2"),
    ]
    assert pairs[0].fact_id == pairs[1].fact_id
    emb = embed(embedder, pairs)
    assert float(emb[0] @ emb[1]) > 0.9
    res = dedup_pairs(pairs, emb, None, 0.9)
    assert [(d.qa_id, d.kind) for d in res.duplicates] == [(pairs[2].qa_id, "exact")]
    assert res.kept == pairs[:2]
