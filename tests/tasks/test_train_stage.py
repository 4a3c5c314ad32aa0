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
