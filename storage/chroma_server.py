"""A Chroma server on loopback for a data home, started on demand and shared by its processes.

Chroma's ``PersistentClient`` is safe for one process only; ``moral deploy``, ``moral serve`` and
their flow runs all need the index at once.  When no ``MORAL_CHROMA_URL`` is set, they call
:func:`ensure_chroma_server`: the first one starts ``chroma run`` on 127.0.0.1 over the data home's
``chroma/`` directory (the same files a PersistentClient uses) and writes its pid and port to
``chroma-server.json``; later ones find it there and reuse it.  A file lock makes the check-and-start
atomic across processes, so two callers never start two servers over the same directory.

The server is a per-home daemon: it outlives the process that started it (others share it), and
``moral chroma status`` / ``moral chroma stop`` show and stop it.  It runs under a small watchdog
(``python -m storage.chroma_server --watch DIR -- chroma run ...``) that stops it when its index
directory is deleted, so a removed data home leaves no server behind.
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


def _project_path() -> str:
    root = str(Path(__file__).resolve().parents[1])  # the watchdog imports this module by name
    rest = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{rest}" if rest else root


def watch(directory: str, argv: list[str], poll_s: float = 2.0) -> int:
    """Run ``argv`` until it exits, until this process gets SIGTERM/SIGINT, or until ``directory``
    is gone (its data home was deleted); then stop it (SIGTERM, SIGKILL after 10 s)."""
    import signal

    child = subprocess.Popen(argv)
    stop = {"now": False}

    def on_signal(_signum, _frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while child.poll() is None and not stop["now"] and Path(directory).exists():
        time.sleep(poll_s)
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return child.returncode or 0


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
                [sys.executable, "-m", "storage.chroma_server", "--watch", str(settings.chroma_path), "--",
                 _chroma_executable(), "run", "--host", "127.0.0.1", "--port", str(port), "--path",
                 str(settings.chroma_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "ANONYMIZED_TELEMETRY": "False", "PYTHONPATH": _project_path()},
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


def status(settings: Settings) -> dict:
    """What ``moral chroma status`` shows: the recorded server, whether it is alive and answering."""
    if settings.chroma_url:
        return {"mode": "external", "url": settings.chroma_url, "answering": heartbeat(settings.chroma_url)}
    server = running_server(settings)
    if server is not None:
        return {"mode": "server", "running": True, "pid": server.pid, "url": server.url, "path": server.path}
    return {"mode": "server", "running": False, "path": str(settings.chroma_path)}


if __name__ == "__main__":  # the watchdog: python -m storage.chroma_server --watch DIR -- ARGV...
    args = sys.argv[1:]
    if len(args) < 4 or args[0] != "--watch" or args[2] != "--":
        sys.exit("usage: python -m storage.chroma_server --watch DIR -- COMMAND [ARGS...]")
    sys.exit(watch(args[1], args[3:]))
