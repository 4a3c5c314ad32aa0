"""The train stage's artifact handling: a finished adapter is found again (a crashed run does not pay
twice), a corrupt leftover is never reused, and files appear only complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe.base_model import model_identity
from storage.settings import Settings
from tasks.train import TrainPair, data_hash, train_candidate

PAIRS = [
    TrainPair("q1", "What is the payload of the Q7?", "2.4 kg"),
    TrainPair("q2", "Who chairs the committee?", "Anand Okereke"),
    TrainPair("q3", "When does the Heron API end?", "30 September 2026"),
]


@pytest.fixture
def tiny_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    return settings.model_copy(
        update={"base_model": str(tiny_model_dir), "epochs": 1, "num_experts": 2, "rank": 2}
    )


def test_data_hash_ignores_order_but_not_content():
    assert data_hash(PAIRS) == data_hash(list(reversed(PAIRS)))
    changed = [*PAIRS[:2], TrainPair("q3", "When does the Heron API end?", "1 October 2026")]
    assert data_hash(changed) != data_hash(PAIRS)


def test_a_trained_adapter_is_reused_and_a_corrupt_one_is_retrained(tiny_settings, tiny_model_dir):
    sha = model_identity(tiny_model_dir)["sha256"]
    first = train_candidate(tiny_settings, tiny_model_dir, sha, PAIRS)
    assert not first.reused
    assert (first.artifact_dir / "adapter_model.safetensors").exists()
    assert (first.artifact_dir / "adapter_config.json").exists()
    assert first.metrics["steps"] >= 1 and first.metrics["train_pairs"] == 3
    assert not list(first.artifact_dir.parent.glob(".tmp-*"))

    again = train_candidate(tiny_settings, tiny_model_dir, sha, PAIRS)
    assert again.reused and again.sha256 == first.sha256 and again.artifact_dir == first.artifact_dir

    weights = first.artifact_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    healed = train_candidate(tiny_settings, tiny_model_dir, sha, PAIRS)
    assert not healed.reused and healed.artifact_dir == first.artifact_dir

    other = train_candidate(tiny_settings, tiny_model_dir, sha, PAIRS[:2])
    assert other.artifact_dir != first.artifact_dir  # another delta, another directory


def test_no_pairs_is_an_error(tiny_settings, tiny_model_dir):
    with pytest.raises(ValueError, match="nothing to train"):
        train_candidate(tiny_settings, tiny_model_dir, "x", [])


def test_warm_start_trains_the_champion_experts(tiny_settings, tiny_model_dir):
    sha = model_identity(tiny_model_dir)["sha256"]
    parent = train_candidate(tiny_settings, tiny_model_dir, sha, PAIRS)
    warm = tiny_settings.model_copy(update={"warm_start": True})
    child = train_candidate(warm, tiny_model_dir, sha, PAIRS, parent_dir=parent.artifact_dir)
    assert not child.reused and child.artifact_dir != parent.artifact_dir
    # Frozen weights would save the loaded adapter unchanged: the weight file itself must differ.
    weights = "adapter_model.safetensors"
    assert (child.artifact_dir / weights).read_bytes() != (parent.artifact_dir / weights).read_bytes()
    assert child.metrics["steps"] >= 1


def test_a_rejected_versions_pairs_are_trained_again_but_never_on_identical_inputs(tiny_settings, tmp_path):
    """Rejection must not lose knowledge (its pairs return to the delta), and must not loop either:
    the same pairs with the same parameters are not trained into the same adapter night after night."""
    from storage.records import QAPair as PairRecord
    from storage.registry import Registry
    from tasks.stages.ingest import ingest_stage
    from tasks.stages.train import train_stage

    src = tmp_path / "docs"
    src.mkdir()
    (src / "q7.md").write_text("The Quillfeather Q7 carries 2.4 kg and flies for 42 minutes.\n")
    ingest_stage(tiny_settings, src, "run-0")
    reg = Registry.from_settings(tiny_settings)
    chunk = reg.chunks()[0]

    def add(question: str, answer: str) -> None:
        reg.add_qa_pairs([PairRecord.new(chunk.chunk_id, chunk.doc_id, question, answer, "train")])

    add("What does the Q7 carry?", "2.4 kg")
    add("How long does the Q7 fly?", "42 minutes")
    first = train_stage(tiny_settings, "run-1")
    assert first.version == 1 and first.delta_pairs == 2
    reg.decide_version(1, "rejected", ["gate: no gain"], actor="test")

    same = train_stage(tiny_settings, "run-2")
    assert same.version is None and "v1 was trained on exactly these pairs" in same.reason

    add("Which drone flies for 42 minutes?", "the Quillfeather Q7")
    second = train_stage(tiny_settings, "run-3")
    assert second.version == 2 and second.delta_pairs == 3  # v1's two pairs are back, plus the new one
    assert set(reg.trained_pairs(2)) == {p.qa_id for p in reg.qa_pairs(split="train")}
    reg.decide_version(2, "promoted", ["gate: better"], actor="test")

    settled = train_stage(tiny_settings, "run-4")
    assert settled.version is None and settled.reason.startswith("no new training pairs")

    # A revoked version's pairs come back too: v3 shipped one new pair and was rolled back.
    add("What does the Quillfeather Q7 carry?", "2.4 kg")
    third = train_stage(tiny_settings, "run-5")
    assert third.version == 3 and third.delta_pairs == 1
    reg.decide_version(3, "promoted", ["gate: better"], actor="test")
    reg.rollback(actor="test", reason="v3 regressed")
    assert reg.get_version(3).status == "revoked" and reg.champion() == 2
    back = train_stage(tiny_settings, "run-6")
    # ... but exactly v3's inputs again would rebuild v3: refused, with what to do instead.
    assert back.version is None and "v3 was trained on exactly these pairs" in back.reason
    assert "revoked" in back.reason
    add("How heavy a load does the Q7 take?", "2.4 kg")
    fourth = train_stage(tiny_settings, "run-7")
    assert fourth.version == 4 and fourth.delta_pairs == 2  # v3's pair is back, plus the new one


def test_a_candidate_awaiting_approval_says_loudly_that_new_pairs_wait(tiny_settings, tmp_path):
    from storage.records import QAPair as PairRecord
    from storage.registry import Registry
    from tasks.stages.ingest import ingest_stage
    from tasks.stages.train import train_stage

    src = tmp_path / "docs"
    src.mkdir()
    (src / "q7.md").write_text("The Quillfeather Q7 carries 2.4 kg and flies for 42 minutes.\n")
    ingest_stage(tiny_settings, src, "run-0")
    reg = Registry.from_settings(tiny_settings)
    chunk = reg.chunks()[0]
    reg.add_qa_pairs(
        [PairRecord.new(chunk.chunk_id, chunk.doc_id, "What does the Q7 carry?", "2.4 kg", "train")]
    )
    first = train_stage(tiny_settings, "run-1")
    reg.hold_for_approval(first.version, ["awaiting approval: nobody resumed the run"], run_id="run-1")
    again = train_stage(tiny_settings, "run-2")
    assert again.resumed and again.version == first.version and again.warning is None  # nothing waits
    reg.add_qa_pairs(
        [PairRecord.new(chunk.chunk_id, chunk.doc_id, "How long does the Q7 fly?", "42 minutes", "train")]
    )
    waiting = train_stage(tiny_settings, "run-3")
    assert waiting.resumed and waiting.version == first.version
    assert waiting.warning and waiting.warning.startswith(
        "1 new train pairs are not trained: v1 awaits approval"
    )
    from flows.refresh import EMPTY_FIELDS
    from tasks.report import summary_text

    text = summary_text({**EMPTY_FIELDS, "run_id": "run-3", "decision": "awaiting approval",
                         "warnings": [waiting.warning]})  # fmt: skip
    assert "WARNING: 1 new train pairs are not trained" in text


def test_recorded_params_keep_earlier_keys_and_configs_come_from_settings(tiny_settings):
    """A setting added later is recorded only when it differs from what earlier adapters were trained
    with; the trainer's and adapter's configs take every value Settings has for them."""
    import dataclasses

    from moe.train import TrainConfig
    from tasks.train import ADDED_LATER, moral_config, train_config, train_params

    params = train_params(tiny_settings.model_copy(update=ADDED_LATER))
    assert set(params) == {"kind", "rank", "alpha", "epochs", "learning_rate", "batch_size", "seed",
                           "warm_start", "num_experts", "top_k"}  # fmt: skip
    # the example mix is recorded where it differs from what adapters before it were trained with
    mixed = train_params(tiny_settings.model_copy(update=ADDED_LATER | {"mix_open_book": 0.15}))
    assert set(mixed) - set(params) == {"mix_open_book", "open_book_prompt"}  # and the prompt it saw
    # replay_kl changes nothing without general replay, so it is not recorded then
    assert "replay_kl" not in train_params(tiny_settings.model_copy(update={"mix_general": 0.0}))
    assert train_params(tiny_settings.model_copy(update={"mix_general": 0.5}))["replay_kl"] is True
    assert train_params(tiny_settings.model_copy(update={"loramoe": True}))["loramoe"] is True
    assert "num_experts" not in train_params(tiny_settings, kind="lora")
    tcfg = train_config(tiny_settings)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & set(type(tiny_settings).model_fields)
    assert shared and all(getattr(tcfg, k) == getattr(tiny_settings, k) for k in shared)
    mcfg = moral_config(tiny_settings, Path("base"), "sha")
    assert (mcfg.num_experts, mcfg.rank, mcfg.base_model_sha256) == (2, 2, "sha")
