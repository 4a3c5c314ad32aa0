"""One refresh at a time per data home: an advisory file lock (``fcntl.flock``) in the data home.

Whichever way a refresh starts (``moral refresh``, the nightly schedule, the UI's Run button, a second
serving process) it takes ``<home>/refresh.lock`` before touching anything.  The kernel holds the
lock for the open file, so a holder that dies, even by SIGKILL, releases it at once: a *stale* lock
can only be the file's leftover text, which the next taker overwrites (and reports as broken).  The
holder writes who it is (pid, host, flow run id, since, what) into the file so that a refused taker
can name it in its error.

The lock is non-blocking by default: a scheduled refresh that finds another one running should fail
fast with a clear message, not queue behind a multi-hour training run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

LOCK_NAME = "refresh.lock"


class LockBusyError(RuntimeError):
    """Another live process holds the lock; ``holder`` says who (None when it wrote nothing yet)."""

    def __init__(self, message: str, holder: LockHolder | None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    since: str  # ISO 8601, UTC
    purpose: str
    flow_run_id: str | None = None

    def describe(self) -> str:
        run = f", flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"{self.purpose} by pid {self.pid} on {self.host}{run}, since {self.since}"

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        try:
            data = json.loads(text)
            return cls(
                pid=int(data["pid"]),
                host=str(data["host"]),
                since=str(data["since"]),
                purpose=str(data.get("purpose", "refresh")),
                flow_run_id=data.get("flow_run_id"),
            )
        except (ValueError, KeyError, TypeError):
            return None


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FileLock:
    """``with FileLock(path, purpose=..., flow_run_id=...):`` -- exclusive across processes and threads.

    ``timeout_s`` = 0 (the default) fails at once when busy; a positive value waits that long.
    After :meth:`acquire`, ``broken`` holds the leftover holder of a stale lock that was taken over
    (its process died without unlocking), for the caller to log.
    """

    def __init__(
        self,
        path: Path | str,
        purpose: str = "refresh",
        flow_run_id: str | None = None,
        timeout_s: float = 0.0,
    ) -> None:
        self.path = Path(path)
        self.purpose = purpose
        self.flow_run_id = flow_run_id
        self.timeout_s = timeout_s
        self.broken: LockHolder | None = None
        self._fd: int | None = None

    def holder(self) -> LockHolder | None:
        """Who the file says holds (or last held) the lock."""
        try:
            return LockHolder.parse(self.path.read_text())
        except OSError:
            return None

    def acquire(self) -> LockHolder:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default): a child process must not inherit, and so keep, the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise self._busy_error() from None
                time.sleep(0.1)
        try:
            previous = LockHolder.parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
            # Text left behind by a holder that died: the kernel already dropped its lock.
            self.broken = previous
            me = LockHolder(
                pid=os.getpid(),
                host=socket.gethostname(),
                since=datetime.now(UTC).isoformat(timespec="seconds"),
                purpose=self.purpose,
                flow_run_id=self.flow_run_id,
            )
            data = (json.dumps(asdict(me)) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd = fd
        return me

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Empty the file first, so a reader never mistakes a finished holder for a live one.
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy_error(self) -> LockBusyError:
        holder = self.holder()
        if holder is None:
            who = "another process (it has not written its name yet)"
        else:
            who = holder.describe()
            if holder.host == socket.gethostname() and not pid_alive(holder.pid):
                # The kernel says the lock is held, so some process still has the file open: a
                # child that inherited it, or a process in another pid namespace (container).
                who += " (that pid is not alive here: another container, or a child holding the file)"
        return LockBusyError(f"{self.purpose} refused: {self.path} is held: {who}", holder)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def refresh_lock(home: Path | str, flow_run_id: str | None = None, purpose: str = "refresh") -> FileLock:
    """The data home's refresh lock (not yet acquired)."""
    return FileLock(Path(home) / LOCK_NAME, purpose=purpose, flow_run_id=flow_run_id)
