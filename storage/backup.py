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
whole backup is written next to ``DIR`` and renamed into place, so ``DIR`` is complete or absent.

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


def backup(settings: Settings, dest: Path | str) -> BackupReport:
    """Copy the registry, the adapters and the evaluations dir of ``settings.home`` into ``dest``."""
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
        reg = Registry.from_settings(settings)
        with reg.transaction() as con:
            con.execute("CHECKPOINT")
            shutil.copyfile(settings.registry_path, tmp / REGISTRY_FILE)
            # DuckDB quotes nothing in this statement's path; refuse a quote rather than escape it.
            export = tmp / EXPORT_DIR
            if "'" in str(export):
                raise BackupError(f"cannot export to a path containing a quote: {export}")
            con.execute(f"EXPORT DATABASE '{export}' (FORMAT parquet)")
            schema = [
                r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
            ]
        copy = Registry(tmp / REGISTRY_FILE)  # opens the snapshot: proves it is readable
        versions = copy.list_versions()
        adapters = _copy_adapters(settings.adapters_dir, tmp / "adapters")
        for v in versions:
            if v.artifact_uri and v.artifact_sha256 and Path(v.artifact_uri).parent == settings.adapters_dir:
                name = Path(v.artifact_uri).name
                if name in adapters:
                    AdapterStore(tmp / "adapters").verify(name, v.artifact_sha256)
        evaluations = 0
        if (settings.home / "evaluations").is_dir():
            shutil.copytree(settings.home / "evaluations", tmp / "evaluations")
            evaluations = sum(1 for p in (tmp / "evaluations").rglob("*") if p.is_file())
        report = BackupReport(
            path=str(dest),
            created_at=utcnow().isoformat(timespec="seconds") + "Z",
            schema_versions=schema,
            versions=len(versions),
            champion=copy.champion(),
            adapters=adapters,
            evaluations=evaluations,
            bytes=sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
        )
        (tmp / MANIFEST).write_text(json.dumps({"source": str(home), **asdict(report)}, indent=2) + "\n")
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


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
    """Lay a backup out as a new data home (which must not exist yet); return the registry path.

    Adapter paths recorded in the registry are absolute, so a restore keeps working only at the
    backed-up home's path or after the files are moved there; the restored home is otherwise a
    faithful copy for inspection and for moving back into place.
    """
    src = Path(backup_dir).expanduser().resolve()
    home = Path(home).expanduser().resolve()
    if not (src / MANIFEST).is_file() or not (src / REGISTRY_FILE).is_file():
        raise BackupError(f"{src} is not a backup made by `moral backup` (no {MANIFEST} / {REGISTRY_FILE})")
    if home.exists() and any(home.iterdir()):
        raise BackupError(f"{home} is not empty; restore into a new directory")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / REGISTRY_FILE, home / REGISTRY_FILE)
    shutil.copytree(src / "adapters", home / "adapters")
    if (src / "evaluations").is_dir():
        shutil.copytree(src / "evaluations", home / "evaluations")
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
