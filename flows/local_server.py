"""The temporary Prefect API server of local mode, tied to the refresh that started it.

Without ``PREFECT_API_URL`` Prefect starts its own API server as a child process and stops it at
exit. A refresh killed with SIGKILL (or the OOM killer) never reaches that exit, and the server
lives on as an orphan, holding its port, memory and SQLite file. So the refresh records the
child's pid in the data home (``prefect-server.json``), and the next refresh in that home first
stops a recorded server whose refresh is gone (after checking, by its command line, that the pid
is still that server). Linux only (``/proc``); elsewhere both steps do nothing.
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


def _children(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces or parentheses, so split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            out.append(int(entry.name))
    return out


def record_local_server(home: Path) -> int | None:
    """Record this process's temporary Prefect server (if it runs one); returns its pid."""
    if not sys.platform.startswith("linux") or os.environ.get("PREFECT_API_URL"):
        return None
    servers = [pid for pid in _children(os.getpid()) if _MARK in command_line(pid)]
    if not servers:
        return None
    state = {"pid": servers[0], "parent": os.getpid()}
    tmp = Path(home) / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, Path(home) / STATE_FILE)
    return servers[0]


def reap_orphaned_local_server(home: Path, wait_s: float = 10.0) -> int | None:
    """Stop the temporary Prefect server a killed refresh in ``home`` left running; returns its pid
    when one was stopped. A server whose refresh still runs is left alone."""
    path = Path(home) / STATE_FILE
    if not sys.platform.startswith("linux") or not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        pid, parent = int(state["pid"]), int(state["parent"])
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if parent != os.getpid() and pid_alive(parent):
        return None  # its refresh is alive (and holds the refresh lock)
    path.unlink(missing_ok=True)
    if not pid_alive(pid) or _MARK not in command_line(pid):
        return None  # gone, or the pid now belongs to another program
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return pid
