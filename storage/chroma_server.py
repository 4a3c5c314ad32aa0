"""A Chroma server on loopback for a data home, started on demand and shared by its processes.

Chroma's ``PersistentClient`` is safe for one process only; ``moral deploy``, ``moral serve`` and
their flow runs all need the index at once.  When no ``MORAL_CHROMA_URL`` is set, they call
:func:`ensure_chroma_server`: the first one starts ``chroma run`` on 127.0.0.1 over the data home's
``chroma/`` directory (the same files a PersistentClient uses) and writes its pid and port to
``chroma-server.json``; later ones find it there and reuse it.  A file lock makes the check-and-start
atomic across processes, so two callers never start two servers over the same directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from storage.lock import FileLock, pid_alive
from storage.settings import Settings

STATE_FILE = "chroma-server.json"
LOG_FILE = "chroma-server.log"
HEARTBEAT = "/api/v2/heartbeat"


class ChromaServerError(RuntimeError):
    """The Chroma server could not be started or does not answer."""


@dataclass(frozen=True)
class ChromaServer:
    pid: int
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _chroma_executable() -> str:
    # The console script installed with chromadb, next to this interpreter (a venv need not be on PATH).
    beside = Path(sys.executable).with_name("chroma")
    found = str(beside) if beside.is_file() else shutil.which("chroma")
    if not found:
        raise ChromaServerError("the `chroma` command (from the chromadb package) was not found")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def heartbeat(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + HEARTBEAT, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def running_server(settings: Settings) -> ChromaServer | None:
    """The server recorded for this data home, if its process is alive and it answers."""
    try:
        data = json.loads((settings.home / STATE_FILE).read_text())
        server = ChromaServer(int(data["pid"]), int(data["port"]), str(data["path"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if server.path != str(settings.chroma_path) or not pid_alive(server.pid) or not heartbeat(server.url):
        return None
    return server


def ensure_chroma_server(settings: Settings, timeout_s: float = 60.0) -> str:
    """URL of the Chroma server this data home's processes share (``MORAL_CHROMA_URL`` when set)."""
    if settings.chroma_url:
        return settings.chroma_url
    settings.home.mkdir(parents=True, exist_ok=True)
    with FileLock(settings.home / "chroma-server.lock", purpose="chroma server start", timeout_s=timeout_s):
        if (server := running_server(settings)) is not None:
            return server.url
        settings.chroma_path.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        log = open(settings.home / LOG_FILE, "ab")  # handed to the child, closed below
        try:
            # start_new_session: the server outlives the process that started it (others share it).
            proc = subprocess.Popen(
                [_chroma_executable(), "run", "--host", "127.0.0.1", "--port", str(port), "--path",
                 str(settings.chroma_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
            )  # fmt: skip
        finally:
            log.close()
        server = ChromaServer(proc.pid, port, str(settings.chroma_path))
        deadline = time.monotonic() + timeout_s
        while not heartbeat(server.url, timeout_s=1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ChromaServerError(
                    f"chroma run did not answer on {server.url} (see {settings.home / LOG_FILE})"
                )
            time.sleep(0.2)
        (settings.home / STATE_FILE).write_text(json.dumps(asdict(server)) + "\n")
        return server.url


def stop_chroma_server(settings: Settings, timeout_s: float = 10.0) -> bool:
    """Stop the server recorded for this data home; False when none was running."""
    server = running_server(settings)
    if server is None:
        return False
    os.kill(server.pid, 15)
    deadline = time.monotonic() + timeout_s
    while pid_alive(server.pid) and time.monotonic() < deadline:
        try:  # reap it when this process started it (a zombie still "exists" for kill(pid, 0))
            os.waitpid(server.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    (settings.home / STATE_FILE).unlink(missing_ok=True)
    return True
