"""Local mode's temporary Prefect server after a killed refresh: the next refresh stops it, and
only it (a live refresh's server, this process's own, or a reused pid are left alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flows.local_server import (
    STATE_FILE,
    _stat,
    command_line,
    reap_orphaned_local_server,
    record_local_server,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def fake_server() -> subprocess.Popen:
    """A child whose command line names Prefect's server factory (what the reap looks for)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "prefect.server.api.server:create_app"]
    )


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def write_state(home, pid: int, parent: int, start: int | None = None) -> None:
    start = _stat(pid)[2] if start is None else start
    (home / STATE_FILE).write_text(json.dumps({"pid": pid, "start": start, "parent": parent}))


def test_an_orphan_is_stopped_and_nothing_else(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = fake_server()
    try:
        time.sleep(0.3)
        with temporary_settings({PREFECT_API_URL: None}):  # local mode, as `moral refresh` runs it
            recorded = record_local_server(tmp_path)
        # A child of this process running Prefect's server: the stand-in, or the test harness's own
        # when a Prefect test ran earlier in this process.
        assert recorded is not None and "prefect.server.api.server:create_app" in command_line(recorded)
        assert json.loads((tmp_path / STATE_FILE).read_text())["parent"] == os.getpid()
        # This process's own server (a second refresh in one process) is left alone.
        write_state(tmp_path, server.pid, parent=os.getpid())
        assert reap_orphaned_local_server(tmp_path) is None and server.poll() is None
        # Its refresh alive in another process: left alone.
        write_state(tmp_path, server.pid, parent=os.getppid())
        assert reap_orphaned_local_server(tmp_path) is None and server.poll() is None
        # The pid reused by another process (another start time): left alone, the record dropped.
        write_state(tmp_path, server.pid, parent=dead_pid(), start=1)
        assert reap_orphaned_local_server(tmp_path) is None and server.poll() is None
        assert not (tmp_path / STATE_FILE).exists()
        # Its refresh gone: stopped.
        write_state(tmp_path, server.pid, parent=dead_pid())
        assert reap_orphaned_local_server(tmp_path) == server.pid
        assert server.wait(timeout=10) != 0 and not (tmp_path / STATE_FILE).exists()
    finally:
        server.kill()
        server.wait()


def test_a_run_attached_to_a_server_records_nothing(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = fake_server()
    try:
        time.sleep(0.3)
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
            assert record_local_server(tmp_path) is None
        assert not (tmp_path / STATE_FILE).exists()
    finally:
        server.kill()
        server.wait()
