"""Housekeeping of a data home: ``moral backup DIR`` (a consistent copy) and ``moral gc`` (files of old
rejected versions).

Backup.  The registry is copied inside one registry transaction: while it is open no other process
can open the DuckDB file (DuckDB's own file lock) and no other thread of this process can start a
transaction (the registry's per-file lock), so the copy is a single point in time.  A ``CHECKPOINT``
first folds the write-ahead log into the file, so the copy is one self-contained file that opens
as it is.  Beside it goes an ``EXPORT DATABASE`` in Parquet, readable by a later DuckDB whose file
format moved on.  Adapter directories are immutable once renamed into place, so copying them after
the registry snapshot is consistent: every version the snapshot references is already complete
(verified against its checksum in the copy); temporary ``.tmp-*`` directories are skipped.  The
Chroma index is copied too (its SQLite file through SQLite's online backup, so a running Chroma
server that only reads is no obstacle; the copy is opened to prove it), and so is every other
folder of the home (``training/``, ``evaluations/``, ``bank/``, ``compare/``, ``reports/``).  The
whole backup runs under the refresh lock (no refresh writes the registry or the index meanwhile),
is written next to ``DIR`` and renamed into place, so ``DIR`` is complete or absent.

Restore.  ``moral restore DIR`` lays a backup out as a new data home, at the same path or another:
adapter paths recorded in the registry are moved to the new home's ``adapters/`` and every
version's files are verified against their checksums before the home is declared restored.

GC.  Only *rejected* versions older than ``gc_rejected_after_days`` lose their files, never a
promoted (possibly a future rollback target) or revoked one (kept for the audit), and only under the
refresh lock, so no refresh is reusing a directory while it goes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

from storage.artifacts import _TMP_PREFIX, AdapterStore
from storage.db import utcnow
from storage.lock import refresh_lock
from storage.registry import Registry
from storage.settings import Settings

MANIFEST = "backup.json"
REGISTRY_FILE = "registry.duckdb"
EXPORT_DIR = "registry-export"
CHROMA_DIR = "chroma"
#: Entries of a data home a backup leaves out: the registry (copied in its transaction), adapters and
#: the index (copied on their own), and the locks and state of running processes.
_NOT_DATA = frozenset(
    {REGISTRY_FILE, f"{REGISTRY_FILE}.wal", "adapters", CHROMA_DIR, "refresh.lock", "chroma-server.lock",
     "chroma-server.json", "chroma-server.log"}
)  # fmt: skip


class BackupError(RuntimeError):
    """The backup could not be made or restored; nothing was left half-written."""


@dataclass
class BackupReport:
    path: str
    created_at: str
    schema_versions: list[int]
    versions: int
    champion: int | None
    adapters: list[str]
    evaluations: int
    bytes: int
    #: vectors per Chroma collection in the copy (empty when the home has no index yet)
    chroma: dict[str, int] = field(default_factory=dict)
    #: the other folders of the home copied (training/, evaluations/, bank/, ...)
    folders: list[str] = field(default_factory=list)


def backup(settings: Settings, dest: Path | str) -> BackupReport:
    """Copy the registry, the adapters, the Chroma index and the other folders of ``settings.home``
    into ``dest``, under the refresh lock."""
    dest = Path(dest).expanduser().resolve()
    home = settings.home
    if dest == home or home in dest.parents:
        raise BackupError(f"the backup directory {dest} must lie outside the data home {home}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} already exists and is not empty; choose a new directory")
    if not settings.registry_path.is_file():
        raise BackupError(f"no registry at {settings.registry_path}: nothing to back up")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with refresh_lock(home, purpose="backup"):
            report = _backup_locked(settings, tmp, dest)
        (tmp / MANIFEST).write_text(json.dumps({"source": str(home), **asdict(report)}, indent=2) + "\n")
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _backup_locked(settings: Settings, tmp: Path, dest: Path) -> BackupReport:
    reg = Registry.from_settings(settings)
    with reg.transaction() as con:
        con.execute("CHECKPOINT")
        shutil.copyfile(settings.registry_path, tmp / REGISTRY_FILE)
        # DuckDB quotes nothing in this statement's path; refuse a quote rather than escape it.
        export = tmp / EXPORT_DIR
        if "'" in str(export):
            raise BackupError(f"cannot export to a path containing a quote: {export}")
        con.execute(f"EXPORT DATABASE '{export}' (FORMAT parquet)")
        schema = [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]
    copy = Registry(tmp / REGISTRY_FILE)  # opens the snapshot: proves it is readable
    versions = copy.list_versions()
    adapters = _copy_adapters(settings.adapters_dir, tmp / "adapters")
    for v in versions:
        if v.artifact_uri and v.artifact_sha256 and Path(v.artifact_uri).parent == settings.adapters_dir:
            name = Path(v.artifact_uri).name
            if name in adapters:
                AdapterStore(tmp / "adapters").verify(name, v.artifact_sha256)
    chroma = _copy_chroma(settings.home / CHROMA_DIR, tmp / CHROMA_DIR)
    folders = []
    for path in sorted(settings.home.iterdir()):
        if path.name in _NOT_DATA or path.name.startswith(".") or _TMP_PREFIX in path.name:
            continue
        if path.is_dir():
            shutil.copytree(path, tmp / path.name)
            folders.append(path.name)
    evaluations = sum(1 for p in (tmp / "evaluations").rglob("*") if p.is_file())
    return BackupReport(
        path=str(dest),
        created_at=utcnow().isoformat(timespec="seconds") + "Z",
        schema_versions=schema,
        versions=len(versions),
        champion=copy.champion(),
        adapters=adapters,
        evaluations=evaluations,
        bytes=sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
        chroma=chroma,
        folders=folders,
    )


def _copy_chroma(src: Path, dst: Path) -> dict[str, int]:
    """Copy a Chroma persistent directory and return the vectors per collection of the copy.

    The SQLite file goes through SQLite's online backup API (a consistent snapshot even while a
    Chroma server holds it open); the segment folders beside it are copied as files."""
    import sqlite3

    if not src.is_dir():
        return {}
    dst.mkdir()
    for path in sorted(src.iterdir()):
        if path.suffix == ".sqlite3":
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            copy = sqlite3.connect(dst / path.name)
            try:
                source.backup(copy)
            finally:
                copy.close()
                source.close()
        elif path.name.endswith(("-wal", "-shm", "-journal")):
            continue  # folded into the snapshot above
        elif path.is_dir():
            shutil.copytree(path, dst / path.name)
        else:
            shutil.copy2(path, dst / path.name)
    return chroma_counts(dst)


def chroma_counts(path: Path) -> dict[str, int]:
    """Vectors per collection of the Chroma directory at ``path``, counted by a fresh client (which
    proves the directory opens)."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    client = chromadb.PersistentClient(path=str(path), settings=ChromaSettings(anonymized_telemetry=False))
    try:
        names = [getattr(c, "name", c) for c in client.list_collections()]
        return {name: client.get_collection(name).count() for name in names}
    finally:
        closer = getattr(client, "close", None)
        if callable(closer):
            closer()


def _copy_adapters(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True)
    names = []
    if src.is_dir():
        for path in sorted(src.iterdir()):
            if path.is_dir() and not path.name.startswith(_TMP_PREFIX):
                shutil.copytree(path, dst / path.name)
                names.append(path.name)
    return names


def restore(backup_dir: Path | str, home: Path | str) -> Path:
    """Lay a backup out as the data home ``home`` (new or empty); return the registry path.

    Everything the backup holds is copied; versions whose files lay in the backed-up home's
    ``adapters/`` are pointed at the new home's (so a restore may go to another path) and each
    version's files are verified against its checksum. A failed restore leaves ``home`` empty.
    """
    src = Path(backup_dir).expanduser().resolve()
    home = Path(home).expanduser().resolve()
    if not (src / MANIFEST).is_file() or not (src / REGISTRY_FILE).is_file():
        raise BackupError(f"{src} is not a backup made by `moral backup` (no {MANIFEST} / {REGISTRY_FILE})")
    if home.exists() and any(home.iterdir()):
        raise BackupError(f"{home} is not empty; restore into a new directory")
    manifest = json.loads((src / MANIFEST).read_text())
    old_adapters = Path(manifest["source"]) / "adapters"
    home.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(src / REGISTRY_FILE, home / REGISTRY_FILE)
        for path in sorted(src.iterdir()):
            if path.is_dir() and path.name != EXPORT_DIR:
                shutil.copytree(path, home / path.name)
        reg = Registry(home / REGISTRY_FILE)
        moved = reg.relocate_artifacts(old_adapters, home / "adapters")
        for v in reg.list_versions():
            if v.artifact_uri and v.artifact_sha256 and Path(v.artifact_uri).parent == home / "adapters":
                AdapterStore(home / "adapters").verify(Path(v.artifact_uri).name, v.artifact_sha256)
        counts = chroma_counts(home / CHROMA_DIR) if (home / CHROMA_DIR).is_dir() else {}
        if counts != manifest.get("chroma", counts):
            raise BackupError(f"the restored index holds {counts}, the backup recorded {manifest['chroma']}")
        reg.log_event(
            "home.restored",
            detail={"from": str(src), "source_home": manifest["source"], "versions_moved": moved},
        )
    except BaseException:
        for path in home.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    return home / REGISTRY_FILE


@dataclass
class GCReport:
    dry_run: bool
    older_than_days: float
    deleted: list[dict] = field(default_factory=list)  # {"version", "path", "bytes"}
    already_gone: list[str] = field(default_factory=list)
    partial_removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def gc(settings: Settings, dry_run: bool = False, actor: str | None = None) -> GCReport:
    """Delete the files of rejected versions older than ``settings.gc_rejected_after_days``."""
    report = GCReport(dry_run=dry_run, older_than_days=settings.gc_rejected_after_days)
    if not settings.registry_path.is_file():
        return report
    # The refresh lock: a refresh may be reusing a content-keyed directory that gc would delete.
    with refresh_lock(settings.home, purpose="gc"):
        reg = Registry.from_settings(settings)
        cutoff = utcnow() - timedelta(days=settings.gc_rejected_after_days)
        for v in reg.gc_candidates(cutoff):
            directory = Path(v.artifact_uri or "")
            if not directory.is_dir():
                report.already_gone.append(v.name)
                continue
            size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            report.deleted.append({"version": v.name, "path": str(directory), "bytes": size})
            report.bytes_freed += size
            if dry_run:
                continue
            AdapterStore(directory.parent).delete(directory.name)
            reg.log_event(
                "version.files-deleted",
                v.version,
                actor=actor,
                detail={"path": str(directory), "bytes": size, "reason": "gc: rejected and old"},
            )
        if not dry_run:
            report.partial_removed = [str(p) for p in AdapterStore(settings.adapters_dir).cleanup_partial()]
    return report
