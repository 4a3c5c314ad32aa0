"""Operations through the CLI and as Prefect flows: promote, rollback (refusals change nothing),
the rollback-adapter flow and its event on a real local Prefect server, and the refresh lock."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cli.main import main
from storage.artifacts import AdapterStore
from storage.registry import Registry


def _version(reg: Registry, store: AdapterStore, key: str, status: str | None = None) -> int:
    info = store.write(key, lambda d: (d / "adapter_model.safetensors").write_bytes(key.encode() * 64))
    v = reg.create_version(artifact_uri=info.uri, artifact_sha256=info.sha256)
    if status is not None:
        reg.decide_version(v, status, [f"{status} in test"])  # type: ignore[arg-type]
    return v


@pytest.fixture
def three(settings):
    """v1 promoted, v2 promoted (champion), v3 rejected, each with real files."""
    reg, store = Registry.from_settings(settings), AdapterStore(settings.adapters_dir)
    return (
        reg,
        store,
        [_version(reg, store, k, s) for k, s in (("a", "promoted"), ("b", "promoted"), ("c", "rejected"))],
    )


def _statuses(reg: Registry) -> list[tuple[int, str, bool]]:
    return [(v.version, v.status, v.is_champion) for v in reg.list_versions()]


def test_cli_promote_needs_reason_and_force_for_a_rejected_version(three, capsys) -> None:
    reg, _, (v1, v2, v3) = three
    with pytest.raises(SystemExit) as exit_info:  # argparse: --reason is required
        main(["promote", "v3"])
    assert exit_info.value.code == 2 and "--reason" in capsys.readouterr().err
    assert main(["promote", "v3", "--reason", "try it"]) == 1
    assert "rejected" in capsys.readouterr().err and reg.champion() == v2
    assert main(["promote", "v3", "--reason", "   ", "--force"]) == 1
    assert "needs a reason" in capsys.readouterr().err

    assert main(["promote", "v3", "--force", "--reason", "gate too strict", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["version"], out["from_status"], out["previous_champion"], out["forced"]) == (
        "v3",
        "rejected",
        "v2",
        True,
    )
    assert out["actor"].startswith("cli:") and reg.champion() == v3
    ev = reg.events(kind="version.promoted", version=v3)[-1]
    assert (
        ev.actor == out["actor"] and ev.detail["force"] is True and ev.detail["reason"] == "gate too strict"
    )


def test_cli_rollback_default_named_and_refusals_change_nothing(three, capsys) -> None:
    reg, store, (v1, v2, v3) = three
    # The previous promoted version's files are tampered with: refused, nothing changes.
    (store.path("a") / "adapter_model.safetensors").write_bytes(b"not the trained weights")
    before, events_before = _statuses(reg), len(reg.events())
    assert main(["rollback", "--reason", "v2 answers badly"]) == 1
    err = capsys.readouterr().err
    assert "refused, nothing changed" in err and "corrupt" in err
    assert _statuses(reg) == before and len(reg.events()) == events_before

    # Missing files are refused the same way.
    store.delete("a")
    assert main(["rollback", "--to", "v1"]) == 1
    assert "missing" in capsys.readouterr().err and _statuses(reg) == before

    # A named target with good files: v2 -> v3 promoted by force, then roll back to v2 by name.
    assert main(["promote", "v3", "--force", "--reason", "try"]) == 0
    capsys.readouterr()
    assert main(["rollback", "--to", "v2", "--reason", "v3 regressed", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["from"], out["to"], out["revoked"]) == ("v3", "v2", "v3")
    assert reg.champion() == v2 and reg.get_version(v3).status == "revoked"
    assert reg.events(kind="rollback")[-1].detail == {"from": v3, "to": v2, "reason": "v3 regressed"}
    # A revoked version cannot be rolled back to, only force-promoted.
    assert main(["rollback", "--to", "v3"]) == 1
    assert "promote --force" in capsys.readouterr().err


def test_rollback_flow_on_a_prefect_server_emits_the_event(prefect_harness, three) -> None:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.params import RollbackParams
    from flows.rollback import EVENT_ROLLED_BACK, rollback_adapter_flow
    from tasks.stages.promote import OperationRefused

    reg, store, (v1, v2, _) = three
    before = _statuses(reg)
    with pytest.raises(OperationRefused, match="rejected"):
        rollback_adapter_flow(RollbackParams(to="v3", reason="wrong target"))
    assert _statuses(reg) == before

    result = rollback_adapter_flow(RollbackParams(reason="nightly regression", actor="ops-ui"))
    assert (result["from"], result["to"], result["event_emitted"]) == ("v2", "v1", True)
    assert result["flow_run_id"] and reg.champion() == v1 and reg.get_version(v2).status == "revoked"
    audit = reg.events(kind="rollback")[-1]
    assert (audit.actor, audit.run_id) == ("ops-ui", result["flow_run_id"])

    wanted = EventFilter(
        event=EventNameFilter(name=[EVENT_ROLLED_BACK]),
        resource=EventResourceFilter(id=[f"moral.adapter.v{v1}"]),
    )
    events = []
    deadline = time.monotonic() + 60  # the server persists events in batches, asynchronously
    with get_client(sync_client=True) as client:
        while not events and time.monotonic() < deadline:
            events = [
                e
                for e in client.read_events(filter=wanted, limit=50).events
                if e.payload.get("reason") == "nightly regression"
            ]
            if not events:
                time.sleep(0.5)
    assert events, "the moral.adapter.rolled-back event never reached the server"
    assert events[0].payload["from"] == "v2"
    assert any(r.id == "moral.adapter.v2" for r in events[0].related)


def test_refresh_flow_refuses_while_another_refresh_holds_the_lock(
    prefect_harness, settings, tmp_path: Path
) -> None:
    from flows.params import RefreshParams
    from flows.refresh import knowledge_refresh
    from storage.lock import LockBusyError, refresh_lock

    with refresh_lock(settings.home, flow_run_id="the-other-run"):
        with pytest.raises(LockBusyError, match="the-other-run") as info:
            knowledge_refresh(RefreshParams(source=str(tmp_path)))
    assert "refresh refused" in str(info.value)
    # Refused before it wrote anything: no run was recorded.
    assert not settings.registry_path.exists() or Registry.from_settings(settings).runs() == []


def test_refresh_fans_out_through_a_dask_local_cluster(
    prefect_harness, settings, monkeypatch, llm_endpoint, source_dir
) -> None:
    pytest.importorskip("prefect_dask", reason="prefect-dask not installed (pip install '.[dask]')")
    from distributed import LocalCluster

    from flows.params import RefreshParams
    from flows.refresh import run_refresh
    from storage.settings import get_settings

    monkeypatch.setenv("MORAL_QA_BACKEND", "openai")
    monkeypatch.setenv("MORAL_QA_BASE_URL", llm_endpoint.base_url)
    monkeypatch.setenv("MORAL_QA_API_KEY", "sk-test-not-a-secret")
    monkeypatch.setenv("MORAL_QA_MODEL", "loopback-qa")
    # Threads in this process keep the test fast; the runner talks to it by address like any cluster.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("MORAL_TASK_RUNNER", "dask")
        monkeypatch.setenv("MORAL_DASK_ADDRESS", cluster.scheduler_address)
        monkeypatch.setenv("MORAL_TASK_RUNNER_WORKERS", "2")
        get_settings.cache_clear()
        summary = run_refresh(RefreshParams(source=str(source_dir), until="qa"), quiet=True)
        prefixes = cluster.scheduler.task_prefixes
        ran = set(prefixes)
        qa_tasks = prefixes["generate_qa"].state_counts["memory"] if "generate_qa" in prefixes else 0
    get_settings.cache_clear()
    assert summary["status"] == "completed" and summary["qa_generated"] > 0 and llm_endpoint.calls > 0
    assert "generate_qa" in ran, ran  # the QA task ran on the cluster
    assert qa_tasks == 2, prefixes[
        "generate_qa"
    ].state_counts  # fanned out: one task per shard of the pending chunks (documents kept whole)
    # Every pending chunk was covered exactly once across the shards.
    reg = Registry.from_settings(get_settings())
    assert reg.chunks_without_qa() == [] and summary["llm_calls"] == llm_endpoint.calls
