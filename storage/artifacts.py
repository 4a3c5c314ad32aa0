"""Adapter files on disk, one immutable directory per version, written atomically with a checksum.

``write`` fills a ``.tmp-*`` directory, records a sha256 of every file, fsyncs, then renames it to
``v{version}``: a reader sees either no directory or a complete one.  A crash leaves only the
temporary directory, which :meth:`AdapterStore.cleanup_partial` removes.  Nothing here unpickles
anything: the files are whatever the writer saved (safetensors + JSON for the project's adapters).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHECKSUM = "CHECKSUM"
_TMP_PREFIX = ".tmp-"


class ArtifactError(RuntimeError):
    """An adapter directory is missing, incomplete, or does not match its recorded checksum."""


@dataclass(frozen=True)
class ArtifactInfo:
    uri: str  # absolute path of the version's directory
    sha256: str  # over every file's relative name and bytes, see AdapterStore.checksum
    files: list[str]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    """Relative posix paths of the regular files under ``directory``, sorted, without CHECKSUM."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != CHECKSUM
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AdapterStore:
    """``root/<key>/`` directories holding one adapter each, plus a ``CHECKSUM`` file.

    A key is a version number (directory ``v{N}``) or a content key (a string naming the directory):
    the refresh flow names a candidate's directory by what determines its weights, writes it before
    the version exists, and registers the version with its uri and checksum in one transaction, so a
    registered version always has complete files and a crashed run's training is found and reused.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, version: int | str) -> Path:
        return self.root / (f"v{version}" if isinstance(version, int) else version)

    def exists(self, version: int | str) -> bool:
        return self.path(version).is_dir()

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        names = (p.name for p in self.root.iterdir() if p.is_dir())
        return sorted(int(n[1:]) for n in names if n.startswith("v") and n[1:].isdigit())

    @staticmethod
    def checksum(directory: Path | str) -> str:
        """sha256 over the sorted files: each file's relative name, a NUL, its own sha256.

        Hashing names too means a renamed or extra file changes the checksum.
        """
        directory = Path(directory)
        digest = hashlib.sha256()
        for name in _files(directory):
            digest.update(
                name.encode("utf-8") + b"\0" + _file_sha256(directory / name).encode("ascii") + b"\n"
            )
        return digest.hexdigest()

    def write(self, version: int | str, writer: Callable[[Path], None]) -> ArtifactInfo:
        """Let ``writer`` fill a temporary directory, checksum it, and move it to ``v{version}`` atomically."""
        final = self.path(version)
        if final.exists():
            raise ArtifactError(f"{final} already exists: adapter versions are immutable")
        self.root.mkdir(parents=True, exist_ok=True)
        # The pid in the name lets cleanup_partial tell a crashed write from one still running.
        tmp = self.root / f"{_TMP_PREFIX}{self.path(version).name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            writer(tmp)
            files = _files(tmp)
            if not files:
                raise ArtifactError(f"the writer for {self.path(version).name} wrote no files")
            per_file = {name: _file_sha256(tmp / name) for name in files}
            total = self.checksum(tmp)
            (tmp / CHECKSUM).write_text(
                json.dumps({"algorithm": "sha256", "sha256": total, "files": per_file}, indent=2) + "\n"
            )
            for name in [*files, CHECKSUM]:
                _fsync(tmp / name)
            _fsync(tmp)
            if final.exists():  # os.rename would silently replace an empty directory
                raise ArtifactError(f"{final} appeared while writing: adapter versions are immutable")
            os.rename(tmp, final)
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ArtifactInfo(str(final), total, files)

    def verify(self, version: int | str, expected_sha256: str | None = None) -> None:
        """Raise :class:`ArtifactError` unless ``v{version}`` is complete and matches its checksum
        (and ``expected_sha256``, the value the registry recorded, when given)."""
        directory = self.path(version)
        if not directory.is_dir():
            raise ArtifactError(f"adapter {directory.name} is missing: no directory {directory}")
        manifest_path = directory / CHECKSUM
        if not manifest_path.is_file():
            raise ArtifactError(f"adapter {directory.name} is incomplete: {manifest_path} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
            recorded: dict[str, str] = manifest["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"adapter {directory.name}: unreadable {CHECKSUM} file ({exc})") from exc
        present = set(_files(directory))
        if missing := sorted(set(recorded) - present):
            raise ArtifactError(f"adapter {directory.name} is incomplete: missing {', '.join(missing)}")
        if extra := sorted(present - set(recorded)):
            raise ArtifactError(f"adapter {directory.name} has unexpected files: {', '.join(extra)}")
        if changed := sorted(n for n, sha in recorded.items() if _file_sha256(directory / n) != sha):
            raise ArtifactError(
                f"adapter {directory.name} is corrupt: checksum mismatch in {', '.join(changed)}"
            )
        actual = self.checksum(directory)
        for label, wanted in (
            ("its CHECKSUM file", manifest.get("sha256")),
            ("the registry", expected_sha256),
        ):
            if wanted is not None and wanted != actual:
                raise ArtifactError(
                    f"adapter {directory.name} does not match {label}: sha256 {actual[:12]}... != {wanted[:12]}..."
                )

    def delete(self, version: int | str) -> bool:
        """Remove a version's directory (e.g. a rejected candidate's); False when there was none.

        Renamed aside first so no reader ever sees a half-deleted directory under the final name.
        """
        directory = self.path(version)
        if not directory.exists():
            return False
        doomed = (
            self.root / f"{_TMP_PREFIX}deleted-{self.path(version).name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        os.rename(directory, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def cleanup_partial(self) -> list[Path]:
        """Remove ``.tmp-*`` directories left by crashed writes (not those of live processes)."""
        if not self.root.is_dir():
            return []
        removed = []
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            pid = path.name.rsplit("-", 2)[-2] if path.name.count("-") >= 3 else ""
            # Our own pid means a write in progress in another thread (a failed one cleans up itself).
            if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return sorted(removed)


def verify_uri(uri: str | Path | None, expected_sha256: str | None, label: str = "adapter") -> None:
    """Verify the adapter directory a registry row points at (``artifact_uri`` + ``artifact_sha256``).

    The one check every loader, promotion and rollback runs before trusting a version's files.
    """
    if not uri:
        raise ArtifactError(f"{label} has no files recorded")
    if not expected_sha256:
        raise ArtifactError(f"{label} has no checksum recorded; its files cannot be trusted")
    path = Path(uri)
    try:
        AdapterStore(path.parent).verify(path.name, expected_sha256)
    except ArtifactError as exc:
        raise ArtifactError(f"{label}: {exc}") from exc
