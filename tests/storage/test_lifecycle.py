"""Registry lifecycle operations on real files: promotion audit, rollback checks, the refresh lock
across processes, gc of rejected versions, and backup + restore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from storage.artifacts import AdapterStore, ArtifactError, verify_uri
from storage.backup import BackupError, backup, gc, restore
from storage.db import utcnow
from storage.lock import FileLock, LockBusyError, refresh_lock
from storage.records import RegistryError
from storage.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def _version(reg: Registry, store: AdapterStore, key: str, status: str | None = None) -> int:
    """A candidate with real adapter files; optionally decided."""
    info = store.write(key, lambda d: (d / "adapter_model.safetensors").write_bytes(key.encode() * 100))
    v = reg.create_version(artifact_uri=info.uri, artifact_sha256=info.sha256, run_id=f"run-{key}")
    if status is not None:
        reg.decide_version(v, status, [f"{status} in test"])  # type: ignore[arg-type]
    return v


@pytest.fixture
def home(settings):
    return settings, Registry.from_settings(settings), AdapterStore(settings.adapters_dir)


# --- transitions --------------------------------------------------------------------------------
def test_forced_promotion_needs_a_reason_and_is_audited(home) -> None:
    _, reg, store = home
    v1 = _version(reg, store, "a", "promoted")
    v2 = _version(reg, store, "b", "rejected")
    with pytest.raises(RegistryError, match="needs a reason"):
        reg.promote(v2, "ops", "  ", force=True)
    with pytest.raises(RegistryError, match="pass force=True"):
        reg.promote(v2, "ops", "looks fine to me")
    promoted = reg.promote(v2, "alice", "gate too strict for this delta", force=True, run_id="fr-1")
    assert promoted.is_champion and promoted.status == "promoted"
    ev = reg.events(kind="version.promoted", version=v2)[-1]
    assert ev.actor == "alice" and ev.run_id == "fr-1"
    assert ev.detail == {
        "manual": True,
        "force": True,
        "from_status": "rejected",
        "reason": "gate too strict for this delta",
    }
    moved = reg.events(kind="alias.moved")[-1]
    assert (moved.detail["from"], moved.detail["to"], moved.run_id) == (v1, v2, "fr-1")


def test_rollback_target_changes_nothing_and_expect_from_guards_a_race(home) -> None:
    _, reg, store = home
    v1 = _version(reg, store, "a", "promoted")
    v2 = _version(reg, store, "b", "promoted")
    before = len(reg.events())
    current, target = reg.rollback_target()
    assert (current.version, target.version) == (v2, v1) and len(reg.events()) == before
    with pytest.raises(RegistryError, match="champion moved"):
        reg.rollback(expect_from=v1, actor="ops")  # someone else's view of the champion
    assert reg.champion() == v2 and reg.get_version(v2).status == "promoted"
    done = reg.rollback(actor="ops", reason="bad answers", run_id="fr-2", expect_from=v2)
    assert (done.from_version, done.to_version) == (v2, v1)
    assert reg.events(kind="rollback")[-1].run_id == "fr-2"


def test_verify_uri_refuses_missing_and_tampered_files(home) -> None:
    _, reg, store = home
    v = reg.get_version(_version(reg, store, "a"))
    verify_uri(v.artifact_uri, v.artifact_sha256, "v1")
    with pytest.raises(ArtifactError, match="no checksum recorded"):
        verify_uri(v.artifact_uri, None, "v1")
    (Path(v.artifact_uri) / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="v1: .*corrupt"):
        verify_uri(v.artifact_uri, v.artifact_sha256, "v1")
    with pytest.raises(ArtifactError, match="missing"):
        verify_uri(str(store.root / "nowhere"), v.artifact_sha256, "v1")


# --- the refresh lock ---------------------------------------------------------------------------
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from storage.lock import refresh_lock
    lock = refresh_lock(sys.argv[1], flow_run_id="flow-run-42")
    lock.acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def _start_holder(home_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(home_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_process_naming_the_holder_and_breaks_when_it_dies(tmp_path: Path) -> None:
    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(LockBusyError) as info:
            refresh_lock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {proc.pid}" in message and "flow run flow-run-42" in message and "since" in message
        assert info.value.holder is not None and info.value.holder.pid == proc.pid
        # The holder dies without unlocking (SIGKILL): the kernel drops its lock at once.
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        lock = refresh_lock(tmp_path, flow_run_id="mine")
        me = lock.acquire()
        try:
            assert me.pid == os.getpid() and lock.broken is not None and lock.broken.pid == proc.pid
            assert json.loads((tmp_path / "refresh.lock").read_text())["flow_run_id"] == "mine"
        finally:
            lock.release()
        assert (tmp_path / "refresh.lock").read_text() == ""  # released cleanly: nothing stale left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_lock_excludes_within_one_process_too(tmp_path: Path) -> None:
    # flock belongs to the open file, so two threads (or two flows in one runner) also exclude.
    with refresh_lock(tmp_path, purpose="refresh"):
        with pytest.raises(LockBusyError, match=f"pid {os.getpid()}"):
            FileLock(tmp_path / "refresh.lock", purpose="gc").acquire()
    with FileLock(tmp_path / "refresh.lock", purpose="gc") as lock:
        assert lock.held and lock.broken is None


# --- gc -------------------------------------------------------------------------------------------
def _age(settings, version: int, days: float) -> None:
    con = duckdb.connect(str(settings.registry_path))
    try:
        con.execute(
            "UPDATE adapter_versions SET updated_at = ? WHERE version = ?",
            [utcnow() - timedelta(days=days), version],
        )
    finally:
        con.close()


def test_gc_deletes_only_old_rejected_versions(home) -> None:
    settings, reg, store = home
    promoted = _version(reg, store, "p", "promoted")
    old_rejected = _version(reg, store, "old", "rejected")
    new_rejected = _version(reg, store, "new", "rejected")
    revoked = _version(reg, store, "r", "promoted")
    reg.rollback(actor="ops")  # r -> revoked, p champion again
    candidate = _version(reg, store, "c")
    for v in (promoted, old_rejected, revoked, candidate):
        _age(settings, v, 30)
    _age(settings, new_rejected, 1)
    (store.root / ".tmp-v9-999999999-deadbeef").mkdir()  # a crashed write (pid cannot exist)

    dry = gc(settings, dry_run=True, actor="test")
    assert [d["version"] for d in dry.deleted] == [f"v{old_rejected}"] and dry.bytes_freed > 0
    assert store.exists("old") and (store.root / ".tmp-v9-999999999-deadbeef").exists()

    report = gc(settings, actor="test")
    assert [d["version"] for d in report.deleted] == [f"v{old_rejected}"]
    assert not store.exists("old") and report.partial_removed
    assert all(store.exists(k) for k in ("p", "new", "r", "c"))
    ev = reg.events(kind="version.files-deleted")
    assert [(e.version, e.actor) for e in ev] == [(old_rejected, "test")]
    assert gc(settings).deleted == []  # idempotent: the directory is gone
    assert gc(settings).already_gone == [f"v{old_rejected}"]


def test_gc_waits_for_no_refresh(home) -> None:
    settings, _, _ = home
    with refresh_lock(settings.home, flow_run_id="busy-run"):
        with pytest.raises(LockBusyError, match="gc refused.*busy-run"):
            gc(settings)


# --- backup and restore ---------------------------------------------------------------------------
def test_backup_is_complete_readable_and_restorable(home, tmp_path: Path) -> None:
    settings, reg, store = home
    v1 = _version(reg, store, "a", "promoted")
    v2 = _version(reg, store, "b", "rejected")
    (settings.home / "evaluations").mkdir()
    (settings.home / "evaluations" / f"v{v2}.json").write_text("{}")
    (store.root / ".tmp-v3-1-x").mkdir()  # in-flight write: not part of a backup

    report = backup(settings, tmp_path / "bk")
    bk = tmp_path / "bk"
    assert report.versions == 2 and report.champion == v1 and report.evaluations == 1
    assert report.adapters == ["a", "b"] and report.schema_versions == sorted(report.schema_versions)
    assert json.loads((bk / "backup.json").read_text())["source"] == str(settings.home)
    assert (bk / "registry-export" / "schema.sql").is_file()
    assert not [p for p in bk.iterdir() if p.name.startswith(".")]

    # The copy is a registry of its own, with the same history, and the originals are untouched.
    copy = Registry(bk / "registry.duckdb")
    assert copy.migrated == [] and [v.status for v in copy.list_versions()] == ["promoted", "rejected"]
    assert len(copy.events()) == len(reg.events())

    restored = restore(bk, tmp_path / "new-home")
    back = Registry(restored)
    assert back.champion() == v1
    assert AdapterStore(tmp_path / "new-home" / "adapters").checksum(
        tmp_path / "new-home" / "adapters" / "a"
    ) == (reg.get_version(v1).artifact_sha256)
    with pytest.raises(BackupError, match="not empty"):
        backup(settings, tmp_path / "bk")
    with pytest.raises(BackupError, match="outside the data home"):
        backup(settings, settings.home / "inner")
    with pytest.raises(BackupError, match="not a backup"):
        restore(tmp_path, tmp_path / "other")


# --- the shared Chroma server ---------------------------------------------------------------------
def test_chroma_server_is_started_once_shared_and_keeps_the_data(settings) -> None:
    import chromadb

    from storage.chroma_server import ensure_chroma_server, heartbeat, running_server, stop_chroma_server

    url = ensure_chroma_server(settings)
    try:
        first = running_server(settings)
        assert first is not None and url == first.url and url.startswith("http://127.0.0.1:")
        assert ensure_chroma_server(settings) == url  # reused, not a second server
        assert running_server(settings).pid == first.pid
        host, port = url.removeprefix("http://").split(":")
        client = chromadb.HttpClient(host=host, port=int(port))
        client.get_or_create_collection("probe").add(ids=["a", "b"], embeddings=[[0.0, 1.0], [1.0, 0.0]])
        assert stop_chroma_server(settings) and not heartbeat(url)
        assert running_server(settings) is None

        url = ensure_chroma_server(settings)  # a fresh server over the same directory
        host, port = url.removeprefix("http://").split(":")
        assert chromadb.HttpClient(host=host, port=int(port)).get_collection("probe").count() == 2

        # A process of this data home without MORAL_CHROMA_URL (e.g. `moral refresh` beside a
        # running `moral serve`) goes through the shared server, not a second PersistentClient.
        from storage.vectors import make_client

        client = make_client(settings)
        assert isinstance(client, chromadb.api.client.Client) and client.get_collection("probe").count() == 2
        assert type(client._server).__name__ == "FastAPI"  # the HTTP transport, not the local segment API
    finally:
        stop_chroma_server(settings)
    # With MORAL_CHROMA_URL set nothing is started.
    assert (
        ensure_chroma_server(settings.model_copy(update={"chroma_url": "http://chroma:8000"}))
        == "http://chroma:8000"
    )


def test_chroma_server_status_stop_and_no_orphan_over_a_deleted_home(settings, capsys) -> None:
    """The per-home Chroma server is shown and stopped by `moral chroma`, and it stops by itself when
    its data home's index directory is deleted (before, such servers ran on as orphans)."""
    import json
    import shutil
    import time

    from cli.main import main
    from storage.chroma_server import ensure_chroma_server, heartbeat, running_server, stop_chroma_server
    from storage.lock import pid_alive

    assert main(["chroma", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["running"] is False
    url = ensure_chroma_server(settings)
    try:
        assert main(["chroma", "status", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["running"] and shown["url"] == url
        assert main(["chroma", "stop"]) == 0
        assert "stopped" in capsys.readouterr().out and not heartbeat(url)

        url = ensure_chroma_server(settings)
        pid = running_server(settings).pid
        shutil.rmtree(settings.chroma_path)  # the data home's index is deleted under the server
        deadline = time.monotonic() + 30
        while (pid_alive(pid) or heartbeat(url)) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # this process started it: reap it
            except ChildProcessError:
                pass
            time.sleep(0.5)
        assert not heartbeat(url) and not pid_alive(pid)
    finally:
        stop_chroma_server(settings)
