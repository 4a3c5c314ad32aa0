"""Replay selection on a real Chroma collection with the bundled embedder: nearest the delta first,
near-duplicates dropped, only eligible earlier train pairs, and the train stage's lineage roles."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.records import Chunk, QAPair
from storage.registry import Registry
from storage.settings import Settings
from storage.vectors import VectorStore
from tasks.dedup import embedding_text
from tasks.index import index_qa
from tasks.replay import replay_for_delta, select_replay

DELTA = [
    ("Which telescope did the Varnholt observatory install in 2025?", "The Celest-9 reflector."),
    ("How wide is the mirror of the Celest-9 reflector at Varnholt?", "2.4 metres."),
]
# Earlier train pairs: three about the observatory (one of them a rewording of another), three about baking.
NEAR = ("Who directs the Varnholt observatory?", "Dr. Ilse Marrow.")
NEAR_REWORDED = ("Who is the director of the Varnholt observatory?", "Dr. Ilse Marrow.")
NEAR_2 = ("What comet did the Varnholt observatory discover?", "Comet Harl-3.")
FAR = [
    ("How long does Brindle Bakery proof its rye dough?", "Fourteen hours."),
    ("Which flour does Brindle Bakery mill for its scones?", "Spelt from Aldmoor."),
    ("What oven temperature does Brindle Bakery use for sourdough?", "245 degrees Celsius."),
]


def pair(q: str, a: str, split: str = "train", doc: str = "doc-a") -> QAPair:
    return QAPair.new(f"chunk-{doc}", doc, q, a, split)  # type: ignore[arg-type]


@pytest.fixture
def store(settings: Settings, embedder) -> VectorStore:
    return VectorStore(settings, embedder)


def index(store: VectorStore, pairs: list[QAPair]) -> None:
    vectors = store.embedder.encode([embedding_text(p.question, p.answer) for p in pairs])
    index_qa(store, pairs, vectors, run_id="r0")


def test_similar_first_then_diverse(store):
    delta = [pair(q, a, doc="doc-new") for q, a in DELTA]
    near, reworded, near2 = pair(*NEAR), pair(*NEAR_REWORDED), pair(*NEAR_2)
    far = [pair(q, a, doc="doc-b") for q, a in FAR]
    index(store, delta + [near, reworded, near2] + far)
    earlier = [near, reworded, near2, *far]

    choice = select_replay(store, delta, [p.qa_id for p in earlier], budget=2)
    # The two observatory pairs that say different things; the rewording is a near-duplicate.
    assert set(choice.ids) == {near2.qa_id, near.qa_id} or set(choice.ids) == {near2.qa_id, reworded.qa_id}
    sims = [choice.similarity[i] for i in choice.ids]
    assert sims == sorted(sims, reverse=True)  # most similar first
    assert all(f.qa_id not in choice.ids for f in far)

    # One more slot: the rewording (cosine distance ~0.04 to its twin) is dropped, a bakery pair taken.
    three = select_replay(store, delta, [p.qa_id for p in earlier], budget=3)
    assert len(three.dropped_near_duplicates) == 1
    assert three.dropped_near_duplicates[0] in {near.qa_id, reworded.qa_id}
    assert len(set(three.ids) & {f.qa_id for f in far}) == 1

    # A larger budget reaches the bakery pairs, still without the near-duplicate.
    wide = select_replay(store, delta, [p.qa_id for p in earlier], budget=10)
    assert len(wide.ids) == 5 and len(set(wide.ids) & {near.qa_id, reworded.qa_id}) == 1
    assert {f.qa_id for f in far} <= set(wide.ids)
    assert wide.ids.index(far[0].qa_id) > wide.ids.index(near2.qa_id)

    # With no diversity threshold the rewording is kept too.
    assert len(select_replay(store, delta, [p.qa_id for p in earlier], budget=10, min_distance=0.0).ids) == 6


def test_never_dev_eval_or_ineligible_pairs(store):
    delta = [pair(q, a, doc="doc-new") for q, a in DELTA]
    held_out = pair(*NEAR, split="eval")
    dev = pair(*NEAR_2, split="dev")
    excluded = pair("What is the Celest-9 reflector's focal length?", "19 metres.")  # not eligible
    far = [pair(q, a, doc="doc-b") for q, a in FAR]
    index(store, delta + [held_out, dev, excluded] + far)
    # Even if a caller wrongly lists held-out ids as eligible, the split filter keeps them out.
    eligible = [held_out.qa_id, dev.qa_id] + [f.qa_id for f in far]
    choice = select_replay(store, delta, eligible, budget=10)
    assert set(choice.ids) == {f.qa_id for f in far}
    assert excluded.qa_id not in choice.ids

    assert select_replay(store, delta, eligible, budget=0).ids == []
    assert select_replay(store, delta, [], budget=5).ids == []
    with pytest.raises(ValueError, match="cosine distance"):
        select_replay(store, delta, eligible, budget=3, min_distance=-1)


def test_train_stage_replays_the_selection_and_records_roles(settings, embedder, tiny_model_dir: Path):
    from tasks.stages.train import train_stage

    s = settings.model_copy(
        update={
            "base_model": str(tiny_model_dir),
            "epochs": 1,
            "num_experts": 2,
            "rank": 2,
            "replay_budget": 2,
            "bank_init": False,
        }
    )
    reg = Registry.from_settings(s)
    for doc in ("doc-a", "doc-b", "doc-new"):
        reg.upsert_document(doc, f"/src/{doc}.md", kind="md", size=1, run_id="r0")
        reg.add_chunks([Chunk(f"chunk-{doc}", doc, 0, "text")], run_id="r0")
    near, reworded, near2 = pair(*NEAR), pair(*NEAR_REWORDED), pair(*NEAR_2)
    far = [pair(q, a, doc="doc-b") for q, a in FAR]
    earlier = [near, reworded, near2, *far]
    delta = [pair(q, a, doc="doc-new") for q, a in DELTA]
    reg.add_qa_pairs(earlier + delta, run_id="r0")
    reg.exclude_pairs([near2.qa_id], reason="wrong answer")  # excluded: never replayed
    # v1 shipped (promoted): its pairs are settled, so they are replay candidates, not delta.
    from moe.base_model import model_identity
    from tasks.train import TrainPair, train_candidate

    sha = model_identity(tiny_model_dir)["sha256"]
    art = train_candidate(s, tiny_model_dir, sha, [TrainPair(p.qa_id, p.question, p.answer) for p in earlier])
    v1 = reg.create_version(
        run_id="r0",
        base_model_sha256=sha,
        artifact_uri=str(art.artifact_dir),
        artifact_sha256=art.sha256,
        trained_pairs={p.qa_id: "delta" for p in earlier},
    )
    reg.decide_version(v1, "promoted", ["test"], actor="test")
    index(VectorStore(s, embedder), earlier + delta)

    summary = train_stage(s, "r1")
    assert summary.version == 2 and summary.delta_pairs == 2 and summary.replay_pairs == 2
    roles = reg.trained_pairs(2)
    replayed = {q for q, r in roles.items() if r == "replay"}
    assert {q for q, r in roles.items() if r == "delta"} == {p.qa_id for p in delta}
    assert near2.qa_id not in replayed  # excluded after indexing: the registry is the authority
    assert len(replayed & {near.qa_id, reworded.qa_id}) == 1  # nearest first, the rewording dropped
    assert summary.replay["chosen"] == 2 and summary.replay["dropped_near_duplicates"] == 1
    assert summary.bank["used"] is False and "off" in summary.bank["reason"]

    # The helper alone: budget 0 means no replay and no Chroma work.
    assert replay_for_delta(s.model_copy(update={"replay_budget": 0}), delta, earlier)[0] == []
