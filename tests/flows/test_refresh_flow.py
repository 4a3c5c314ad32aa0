"""The whole refresh flow end to end on a tiny model: real PDFs, DuckDB, Chroma, the Prefect harness,
and a real HTTP LLM endpoint on loopback."""

from __future__ import annotations

import pytest

from flows.params import RefreshParams
from flows.refresh import run_refresh
from storage.registry import Registry
from storage.settings import get_settings
from storage.vectors import CHUNKS, QA_PAIRS, VectorStore

pytestmark = pytest.mark.integration


@pytest.fixture
def flow_env(settings, monkeypatch, tiny_model_dir, llm_endpoint, prefect_harness):
    monkeypatch.setenv("MORAL_BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("MORAL_QA_BACKEND", "openai")
    monkeypatch.setenv("MORAL_QA_BASE_URL", llm_endpoint.base_url)
    monkeypatch.setenv("MORAL_QA_API_KEY", "sk-test-not-a-secret")
    monkeypatch.setenv("MORAL_QA_MODEL", "loopback-qa")
    monkeypatch.setenv("MORAL_HOLDOUT_SIZE", "4")
    monkeypatch.setenv("MORAL_DRIFT_SIZE", "4")
    monkeypatch.setenv("MORAL_GATE_OVERRIDE", "tests: a tiny model on tiny suites")
    monkeypatch.setenv("MORAL_EPOCHS", "2")
    monkeypatch.setenv("MORAL_NUM_EXPERTS", "4")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_refresh_end_to_end_then_rerun_is_a_no_op(flow_env, llm_endpoint, source_dir):
    settings = flow_env
    first = run_refresh(RefreshParams(source=str(source_dir)), quiet=True)

    assert first["status"] == "completed"
    assert first["documents_new"] == 4
    assert [q["path"].endswith("broken.pdf") for q in first["documents_quarantined"]] == [True]
    assert first["documents_quarantined"][0]["reason"]
    assert first["chunks"] > 0 and first["qa_generated"] > 0 and first["qa_indexed"] > 0
    assert first["llm_calls"] == llm_endpoint.calls > 0
    assert first["version"] == "v1"
    assert first["decision"] in ("promoted", "rejected") and first["reasons"]

    reg = Registry(settings.registry_path)
    [v1] = reg.list_versions()
    assert v1.status == first["decision"] and v1.decision_reasons == first["reasons"]
    assert v1.artifact_sha256 and v1.base_model_sha256
    assert (v1.is_champion is True) == (first["decision"] == "promoted")
    evals = reg.evaluations(version=1)
    assert {(e.model, e.suite) for e in evals} >= {
        ("base", "unseen"), ("candidate", "unseen"), ("candidate", "world_knowledge"), ("candidate", "drift"),
    }  # fmt: skip
    # The loopback endpoint asks each fact once: no fact has a far second wording, so there are no
    # paraphrase questions and the gate cannot decide a gain.
    assert first["decision"] == "rejected" and any(
        "too few questions to decide" in r for r in first["reasons"]
    )
    assert first["reasons"][0] == "override: tests: a tiny model on tiny suites"  # said first, audited
    assert [e.detail["reason"] for e in Registry(settings.registry_path).events(kind="gate.override")] == [
        "tests: a tiny model on tiny suites"
    ]
    store = VectorStore(settings)
    assert store.count(CHUNKS) == first["chunks"]
    assert store.count(QA_PAIRS) == first["qa_indexed"]

    calls_before = llm_endpoint.calls
    second = run_refresh(RefreshParams(source=str(source_dir)), quiet=True)
    assert second["status"] == "completed"
    assert second["documents_new"] == 0 and second["documents_unchanged"] == 4
    assert second["llm_calls"] == 0 and llm_endpoint.calls == calls_before
    assert second["qa_generated"] == 0 and second["qa_indexed"] == 0 and second["chunks"] == 0
    assert second["version"] is None and second["decision"] == "skipped"
    assert len(reg.list_versions()) == 1
    assert store.count(QA_PAIRS) == first["qa_indexed"]


def test_until_stops_after_a_stage_and_the_next_run_picks_up(flow_env, llm_endpoint, source_dir):
    settings = flow_env
    partial = run_refresh(RefreshParams(source=str(source_dir), until="index"), quiet=True)
    assert partial["decision"] == "skipped" and partial["reasons"] == ["stopped after index"]
    assert partial["qa_indexed"] > 0 and partial["version"] is None
    calls = llm_endpoint.calls

    full = run_refresh(RefreshParams(source=str(source_dir)), quiet=True)
    assert full["llm_calls"] == 0 and llm_endpoint.calls == calls  # nothing paid twice
    assert full["qa_generated"] == 0 and full["version"] == "v1"
    assert full["decision"] in ("promoted", "rejected")
    assert len(Registry(settings.registry_path).list_versions()) == 1


def test_a_rerun_after_evaluate_verifies_the_files_and_reuses_only_scores_of_the_same_models(
    flow_env, llm_endpoint, source_dir
):
    """After `--until evaluate` the next run decides on the saved scores, but only after checking
    the candidate's files (a tampered adapter is never promoted) and only when the scores were made
    with the same base, candidate and champion (otherwise it evaluates again)."""
    import json
    from pathlib import Path

    from storage.home import scores_path

    settings = flow_env
    partial = run_refresh(RefreshParams(source=str(source_dir), until="evaluate"), quiet=True)
    assert partial["version"] == "v1" and partial["reasons"] == ["stopped after evaluate"]
    reg = Registry(settings.registry_path)
    v1 = reg.get_version(1)
    saved_path = scores_path(settings, 1)
    saved = json.loads(saved_path.read_text())
    assert saved["candidate_sha256"] == v1.artifact_sha256 and saved["champion_version"] is None
    assert saved["base_sha256"] == v1.base_model_sha256

    weights = next(p for p in Path(v1.artifact_uri).iterdir() if p.suffix == ".safetensors")
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + b"tampered")
    with pytest.raises(Exception, match="checksum|does not match|tampered|mismatch"):
        run_refresh(RefreshParams(source=str(source_dir)), quiet=True)
    assert reg.get_version(1).status == "candidate" and reg.champion() is None  # nothing decided

    weights.write_bytes(original)
    saved["base_sha256"] = "0" * 64  # as if made with another base model
    saved_path.write_text(json.dumps(saved))
    done = run_refresh(RefreshParams(source=str(source_dir)), quiet=True)
    assert done["status"] == "completed" and done["decision"] in ("promoted", "rejected")
    assert json.loads(saved_path.read_text())["base_sha256"] == v1.base_model_sha256  # evaluated again
    assert reg.get_version(1).status == done["decision"]


def test_a_deployment_run_reads_and_writes_only_where_the_deployment_allows(
    flow_env, source_dir, tmp_path, monkeypatch
):
    """A run started from a deployment (the Prefect UI's Run form) may ingest only from
    MORAL_ALLOWED_SOURCES (default: MORAL_REFRESH_SOURCE) and use only its own data home; it is
    refused before anything is written. The same parameters from the CLI are not restricted."""
    from flows.params import RollbackParams, RunRefused
    from flows.refresh import knowledge_refresh
    from flows.rollback import rollback_adapter_flow

    settings = flow_env
    monkeypatch.setenv("MORAL_REFRESH_SOURCE", str(source_dir))
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "3f2a0c1e-ui-run")  # as in a deployment run
    get_settings.cache_clear()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.md").write_text("# Keys\n\nThe vault code is 4711.\n")
    escape = source_dir / "link"
    escape.symlink_to(outside)
    other_home = tmp_path / "other-home"
    for params, what in [
        (RefreshParams(source=str(outside)), "source"),
        (RefreshParams(source=str(escape)), "source"),  # a symlink out of the allowed folder
        (RefreshParams(source=str(source_dir / ".." / "elsewhere")), "source"),
        (RefreshParams(source=str(source_dir), home=str(other_home)), "home"),
    ]:
        with pytest.raises(RunRefused, match=what):
            knowledge_refresh(params)
    with pytest.raises(RunRefused, match="home"):
        rollback_adapter_flow(RollbackParams(home=str(other_home)))
    assert not other_home.exists() and not settings.registry_path.exists()  # nothing was written

    # The allowed folder (and one added by MORAL_ALLOWED_SOURCES) runs.
    monkeypatch.setenv("MORAL_ALLOWED_SOURCES", f"{source_dir}:{outside}")
    get_settings.cache_clear()
    done = knowledge_refresh(RefreshParams(source=str(outside), until="ingest"))
    assert done["status"] == "completed" and done["documents_new"] == 1

    # From the CLI (no deployment) nothing is restricted.
    monkeypatch.delenv("PREFECT__RUNTIME__DEPLOYMENT__ID")
    monkeypatch.delenv("MORAL_ALLOWED_SOURCES")
    get_settings.cache_clear()
    cli = run_refresh(RefreshParams(source=str(outside), home=str(other_home), until="ingest"), quiet=True)
    assert cli["status"] == "completed" and other_home.exists()


def test_a_restored_home_answers_serves_and_refreshes_as_before(flow_env, llm_endpoint, source_dir, tmp_path):
    """`moral backup` then `moral restore` into another path: the registry, the adapters (moved and
    verified), the Chroma index and the training logs come back; the champion answers the same
    closed- and open-book, with the same passages, and a refresh of the same folder is a no-op."""
    from cli.main import main
    from server.model import answer_question
    from storage.backup import BackupError, restore

    settings = flow_env
    first = run_refresh(RefreshParams(source=str(source_dir)), quiet=True)
    assert first["version"] == "v1"
    reg = Registry(settings.registry_path)
    reg.promote(1, "test", "a champion to restore", force=True)
    assert (settings.home / "training").is_dir()
    question = "What does the Quillfeather Q7 weigh?"
    before = [answer_question(question, open_book=ob, settings=settings) for ob in (False, True)]

    assert main(["backup", str(tmp_path / "bk")]) == 0
    new_home = tmp_path / "restored"
    assert main(["restore", str(tmp_path / "bk"), "--home", str(new_home)]) == 0
    with pytest.raises(BackupError, match="not empty"):  # never over a home in use
        restore(tmp_path / "bk", new_home)

    moved = settings.model_copy(update={"home": new_home})
    back = Registry(moved.registry_path)
    assert back.champion() == 1 and back.get_version(1).artifact_uri.startswith(str(new_home / "adapters"))
    assert back.get_version(1).artifact_sha256 == reg.get_version(1).artifact_sha256
    assert [e.kind for e in back.events()][-1] == "home.restored"
    assert sorted(p.name for p in (new_home / "training").iterdir()) == sorted(
        p.name for p in (settings.home / "training").iterdir()
    )
    old_store, new_store = VectorStore(settings), VectorStore(moved)
    for collection in (CHUNKS, QA_PAIRS):
        assert new_store.count(collection) == old_store.count(collection) > 0
    after = [answer_question(question, open_book=ob, settings=moved) for ob in (False, True)]
    assert [(a["answer"], a["version"], a["sources"]) for a in after] == [
        (b["answer"], b["version"], b["sources"]) for b in before
    ]
    assert after[0]["version"] == "v1" and after[1]["sources"]

    calls = llm_endpoint.calls
    again = run_refresh(RefreshParams(source=str(source_dir), home=str(new_home)), quiet=True)
    assert (
        again["status"] == "completed" and again["documents_new"] == 0 and again["documents_unchanged"] == 4
    )
    assert again["llm_calls"] == 0 and llm_endpoint.calls == calls and again["version"] is None
    assert new_store.count(QA_PAIRS) == old_store.count(QA_PAIRS)
