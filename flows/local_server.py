"""The temporary Prefect API server of local mode, tied to the refresh that started it.

Without an API URL Prefect starts its own API server as a child process and stops it at exit. A
refresh killed with SIGKILL (or the OOM killer) never reaches that exit, and the server lives on
as an orphan, holding its port, memory and SQLite file. So the refresh records the child (pid,
start time) in the data home (``prefect-server.json``), and the next refresh in that home first
stops a recorded server whose refresh is gone, after checking that the pid is still that same
process (start time and command line). A clean exit removes the record. Linux only (``/proc``);
elsewhere both steps do nothing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from storage.lock import pid_alive

STATE_FILE = "prefect-server.json"
_MARK = "prefect.server.api.server:create_app"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) from ``/proc/PID/stat``, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces or parentheses, so split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie nobody reaps still answers ``kill(pid, 0)``)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and pid_alive(pid)


def _local_mode() -> bool:
    from prefect.settings import PREFECT_API_URL

    return sys.platform.startswith("linux") and not PREFECT_API_URL.value()


def record_local_server(home: Path) -> int | None:
    """Record this process's temporary Prefect server (if it runs one); returns its pid."""
    if not _local_mode():
        return None
    me = os.getpid()
    servers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[1] == me:
            if _MARK in command_line(int(entry.name)):
                servers.append((int(entry.name), stat[2]))
    if not servers:
        return None
    pid, started = servers[0]
    tmp = Path(home) / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"pid": pid, "start": started, "parent": me}) + "\n")
    os.replace(tmp, Path(home) / STATE_FILE)
    return pid


def forget_local_server(home: Path) -> None:
    """A clean exit: Prefect stops its server itself, the record goes."""
    path = Path(home) / STATE_FILE
    try:
        if int(json.loads(path.read_text())["parent"]) == os.getpid():
            path.unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass


def reap_orphaned_local_server(home: Path, wait_s: float = 10.0) -> int | None:
    """Stop the temporary Prefect server a killed refresh in ``home`` left running; returns its pid
    when one was stopped. A server whose refresh still runs (this process included) is left alone."""
    path = Path(home) / STATE_FILE
    if not sys.platform.startswith("linux") or not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        pid, started, parent = int(state["pid"]), int(state["start"]), int(state["parent"])
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if parent == os.getpid() or _running(parent):
        return None  # its refresh is alive (and holds the refresh lock, or is this process)
    path.unlink(missing_ok=True)
    stat = _stat(pid)
    if stat is None or stat[2] != started or not _running(pid) or _MARK not in command_line(pid):
        return None  # gone, or the pid now belongs to another process
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # exited meanwhile, or not ours to stop
        return None
    return pid
