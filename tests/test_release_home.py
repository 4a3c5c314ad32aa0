"""A data home made by the 0.1.0 release (``tests/data/build_release_home.py``: registry, embedded
Chroma, a promoted adapter) still opens with today's code, and the deployments' entrypoints load.

The registry records absolute artifact paths, so the archive unpacks to the path it was built at."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "tests" / "data" / "release-home-0.1.0.tar.gz"
BUILT_AT = Path("/tmp/moral-release-home-0.1.0")


@pytest.fixture(scope="module")
def release_home():
    shutil.rmtree(BUILT_AT, ignore_errors=True)
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(BUILT_AT.parent, filter="data")
    yield BUILT_AT
    shutil.rmtree(BUILT_AT, ignore_errors=True)


@pytest.fixture
def release_settings(release_home, settings, monkeypatch):
    monkeypatch.setenv("MORAL_HOME", str(release_home / "home"))
    return settings.model_copy(
        update={
            "home": release_home / "home",
            "base_model": str(release_home / "base"),
            "epochs": 1,
            "num_experts": 2,
            "rank": 2,
        }
    )


def release_training(settings):
    """The release's training settings: the example kinds added since are off, as they were then, and
    the learning rate is the release's (the default has been 2e-3 since)."""
    from tasks.train import ADDED_LATER

    return settings.model_copy(update={**ADDED_LATER, "learning_rate": 1e-3})


def test_the_registry_and_chroma_of_a_release_home_open(release_settings):
    from storage.artifacts import verify_uri
    from storage.registry import Registry
    from storage.vectors import CHUNKS, QA_PAIRS, VectorStore

    reg = Registry.from_settings(release_settings)
    assert reg.champion() == 1
    v1 = reg.get_version(1)
    verify_uri(v1.artifact_uri, v1.artifact_sha256)  # the promoted adapter's files still verify
    pairs = reg.qa_pairs()
    assert len(pairs) == 4 and all(p.fact_id for p in pairs)
    store = VectorStore(release_settings)
    assert store.count(QA_PAIRS) == 4 and store.count(CHUNKS) == len(reg.chunks()) == 1
    hits = store.query(QA_PAIRS, ["Who designed the Quillfeather Q7?"], k=1)[0]
    assert hits and hits[0].metadata["fact_id"]


def test_the_release_adapter_key_is_found_again(release_settings):
    """The recorded training params define the artifact key: the same pairs and settings find the
    release's adapter instead of training a new one."""
    from moe.base_model import model_identity
    from storage.registry import Registry
    from tasks.train import TrainPair, train_candidate

    reg = Registry.from_settings(release_settings)
    v1 = reg.get_version(1)
    pairs = [TrainPair(p.qa_id, p.question, p.answer) for p in reg.qa_pairs(split="train")]
    base = Path(release_settings.base_model)
    out = train_candidate(release_training(release_settings), base, model_identity(base)["sha256"], pairs)
    assert out.reused and str(out.artifact_dir) == v1.artifact_uri
    recorded = json.loads((out.artifact_dir / "train_params.json").read_text())
    assert {k: v for k, v in recorded.items() if k != "data_hash"} == out.params


def test_the_server_answers_with_the_release_champion(release_settings):
    from server.model import answer_question

    out = answer_question("Who designed the Quillfeather Q7?", settings=release_settings)
    assert out["version"] == "v1" and isinstance(out["answer"], str)


def test_the_deployment_entrypoints_load():
    from prefect.flows import load_flow_from_entrypoint

    from flows.params import RefreshParams

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name
        params = deployment.get("parameters", {}).get("params")
        if params and "refresh" in deployment["entrypoint"]:
            RefreshParams(**params)
