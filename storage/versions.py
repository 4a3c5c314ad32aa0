"""Adapter versions and aliases, MLflow-registry style: versions 1, 2, 3..., a ``champion`` alias,
promotion, rollback.

A version row is immutable once written except for its status, decision reasons, updated_at, and
two set-once fields (metrics after evaluation, the artifact after its files are written).
Status moves only along these edges; anything else raises :class:`RegistryError`::

    candidate --decide/promote--> promoted --rollback/revoke--> revoked
    candidate --decide----------> rejected
    rejected, revoked --promote(force=True)--> promoted     (an operator's explicit override)

A refresh can only *decide* a candidate, so it can never bring back a revoked version.  Moving the
``champion`` alias always happens in the same transaction as the status change, with events.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from storage.db import Con, Database, dumps, event, fetch, utcnow
from storage.records import RegistryError, Rollback, Version, VersionKind, format_version, parse_version

CHAMPION = "champion"
_SELECT = (
    "SELECT v.*, (a.alias IS NOT NULL) AS is_champion FROM adapter_versions v "
    f"LEFT JOIN aliases a ON a.alias = '{CHAMPION}' AND a.version = v.version"
)


class VersionsMixin(Database):
    """Version and alias operations of :class:`storage.registry.Registry`."""

    def create_version(
        self,
        *,
        run_id: str | None = None,
        base_model: str | None = None,
        base_model_sha256: str | None = None,
        data_hash: str | None = None,
        params: dict[str, Any] | None = None,
        parent_version: int | None = None,
        kind: VersionKind = "moral",
        artifact_uri: str | None = None,
        artifact_sha256: str | None = None,
        actor: str | None = None,
        trained_pairs: dict[str, str] | None = None,
    ) -> int:
        """Register a new candidate and return its number (max + 1, computed inside the transaction).

        ``trained_pairs`` maps each QA pair trained on to its role ('delta' or 'replay'): the lineage,
        written in the same transaction.
        """
        now = utcnow()
        with self.transaction() as con:
            if parent_version is not None:
                _get(con, parent_version)
            row = con.execute("SELECT coalesce(max(version), 0) + 1 FROM adapter_versions").fetchone()
            assert row is not None
            version = int(row[0])
            con.execute(
                "INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, 'candidate', '[]', ?, ?, ?)",
                [
                    version,
                    run_id,
                    parent_version,
                    base_model,
                    base_model_sha256,
                    data_hash,
                    dumps(params or {}),
                    artifact_uri,
                    artifact_sha256,
                    kind,
                    now,
                    now,
                ],
            )
            event(
                con,
                "version.created",
                version,
                run_id,
                actor,
                {"parent_version": parent_version, "kind": kind, "data_hash": data_hash},
            )
            if trained_pairs:
                con.executemany(
                    "INSERT INTO version_pairs VALUES (?, ?, ?)",
                    [[version, qa_id, role] for qa_id, role in sorted(trained_pairs.items())],
                )
        return version

    def set_version_artifact(
        self, version: int | str, uri: str, sha256: str, actor: str | None = None
    ) -> None:
        """Attach the written adapter files (once: a version's files are immutable)."""
        with self.transaction() as con:
            current = _get(con, version)
            if current.artifact_sha256 is not None and current.artifact_sha256 != sha256:
                raise RegistryError(
                    f"{current.name} already has an artifact ({current.artifact_sha256[:12]}...)"
                )
            _update(con, current.version, artifact_uri=uri, artifact_sha256=sha256)
            event(
                con,
                "version.artifact",
                current.version,
                current.run_id,
                actor,
                {"uri": uri, "sha256": sha256},
            )

    def relocate_artifacts(
        self, old_dir: str | Path, new_dir: str | Path, actor: str | None = None
    ) -> list[int]:
        """Point the versions whose files lay in ``old_dir`` at the same names in ``new_dir`` (a data
        home restored to another path); the checksums stay, so the files are verified as before.
        Returns the versions moved; each move is an event."""
        old, new = Path(old_dir), Path(new_dir)
        moved = []
        with self.transaction() as con:
            for v in fetch(con, Version, f"{_SELECT} ORDER BY v.version"):
                if v.artifact_uri and Path(v.artifact_uri).parent == old and old != new:
                    uri = str(new / Path(v.artifact_uri).name)
                    _update(con, v.version, artifact_uri=uri)
                    event(
                        con, "version.relocated", v.version, None, actor, {"from": v.artifact_uri, "to": uri}
                    )
                    moved.append(v.version)
        return moved

    def set_version_metrics(
        self, version: int | str, metrics: dict[str, Any], actor: str | None = None
    ) -> None:
        """Attach evaluation metrics (once)."""
        with self.transaction() as con:
            current = _get(con, version)
            if current.metrics is not None:
                raise RegistryError(
                    f"{current.name} already has metrics; they are set once, after evaluation"
                )
            _update(con, current.version, metrics=dumps(metrics))
            event(con, "version.metrics", current.version, current.run_id, actor, {"keys": sorted(metrics)})

    def trained_pairs(self, version: int | str | None = None) -> dict[str, str]:
        """QA pairs trained on: by ``version``, or by any version (qa_id -> role) when None."""
        with self.transaction() as con:
            if version is None:
                rows = con.execute("SELECT qa_id, min(role) FROM version_pairs GROUP BY qa_id").fetchall()
            else:
                rows = con.execute(
                    "SELECT qa_id, role FROM version_pairs WHERE version = ?", [parse_version(version)]
                ).fetchall()
        return {qa_id: role for qa_id, role in rows}

    def settled_pairs(self) -> set[str]:
        """QA pairs some promoted version was trained on. A rejected version's pairs are not settled
        (its knowledge never shipped), nor a revoked one's (it was rolled back: what it learned is no
        longer served), so the next refresh trains on them again."""
        with self.transaction() as con:
            rows = con.execute(
                "SELECT DISTINCT vp.qa_id FROM version_pairs vp JOIN adapter_versions av USING (version) "
                "WHERE av.status = 'promoted'"
            ).fetchall()
        return {qa_id for (qa_id,) in rows}

    def get_version(self, version: int | str) -> Version:
        with self.transaction() as con:
            return _get(con, version)

    def list_versions(self, status: str | None = None) -> list[Version]:
        if status is None:
            return self.read(Version, f"{_SELECT} ORDER BY v.version")
        return self.read(Version, f"{_SELECT} WHERE v.status = ? ORDER BY v.version", [status])

    def champion(self) -> int | None:
        return self.aliases().get(CHAMPION)

    def aliases(self) -> dict[str, int]:
        with self.transaction() as con:
            return dict(con.execute("SELECT alias, version FROM aliases ORDER BY alias").fetchall())

    def set_alias(
        self, alias: str, version: int | str, actor: str | None = None, reason: str | None = None
    ) -> None:
        """Point an alias at a version; ``champion`` may only point at a promoted version."""
        with self.transaction() as con:
            target = _get(con, version)
            if target.status == "revoked" or (alias == CHAMPION and target.status != "promoted"):
                raise RegistryError(f"cannot point '{alias}' at {target.name}: it is {target.status}")
            if alias == CHAMPION:
                _require_artifact(target)
            _move_alias(con, alias, target.version, actor, reason)

    def decide_version(
        self,
        version: int | str,
        status: Literal["promoted", "rejected"],
        reasons: list[str],
        actor: str | None = "gate",
        run_id: str | None = None,
    ) -> Version:
        """Record the gate's decision on a candidate; 'promoted' also moves the champion alias."""
        if status not in ("promoted", "rejected"):
            raise RegistryError(f"a decision is 'promoted' or 'rejected', not {status!r}")
        with self.transaction() as con:
            current = _get(con, version)
            if current.status != "candidate":
                raise RegistryError(
                    f"{current.name} is {current.status}; only a candidate can be decided "
                    "(use promote/rollback for manual changes)"
                )
            if status == "promoted":
                _require_artifact(current)
            _update(con, current.version, status=status, decision_reasons=dumps(list(reasons)))
            event(
                con,
                f"version.{status}",
                current.version,
                run_id or current.run_id,
                actor,
                {"reasons": reasons},
            )
            if status == "promoted":
                _move_alias(
                    con, CHAMPION, current.version, actor, "promoted by the gate", run_id or current.run_id
                )
            return _get(con, current.version)

    def promote(
        self,
        version: int | str,
        actor: str | None,
        reason: str,
        force: bool = False,
        run_id: str | None = None,
    ) -> Version:
        """An operator's promotion: a candidate, an earlier promoted version, or (``force``) a
        rejected or revoked one becomes champion.  ``reason`` is required (it is the audit trail);
        ``run_id`` is the flow run that did it, when one did.  The caller verifies the files first."""
        if not reason or not reason.strip():
            raise RegistryError("a promotion needs a reason (it is written to the audit log)")
        with self.transaction() as con:
            current = _get(con, version)
            if current.is_champion:
                raise RegistryError(f"{current.name} is already the champion")
            if current.status in ("rejected", "revoked") and not force:
                why = "; ".join(current.decision_reasons) or "no reasons recorded"
                raise RegistryError(
                    f"{current.name} is {current.status} ({why}); pass force=True (--force) to promote it anyway"
                )
            _require_artifact(current)
            reasons = [*current.decision_reasons, f"promoted by {actor or 'unknown'}: {reason}"]
            _update(con, current.version, status="promoted", decision_reasons=dumps(reasons))
            event(
                con,
                "version.promoted",
                current.version,
                run_id,
                actor,
                {"manual": True, "force": force, "from_status": current.status, "reason": reason},
            )
            _move_alias(con, CHAMPION, current.version, actor, reason, run_id)
            return _get(con, current.version)

    def rollback_target(self, to: int | str | None = None) -> tuple[Version, Version]:
        """(current champion, the version a rollback would move to), changing nothing: the caller
        verifies the target's files with this before calling :meth:`rollback`."""
        with self.transaction() as con:
            return _rollback_target(con, to)

    def rollback(
        self,
        to: int | str | None = None,
        actor: str | None = None,
        reason: str = "rollback",
        run_id: str | None = None,
        expect_from: int | None = None,
    ) -> Rollback:
        """Move the champion back (to the previous promoted version by default) and revoke the one
        rolled back from.  The target's files are verified here too (callers check them first, see
        :meth:`rollback_target`, to refuse before anything else); ``expect_from`` makes the rollback
        refuse if the champion moved since that check."""
        with self.transaction() as con:
            current, target = _rollback_target(con, to)
            if expect_from is not None and current.version != expect_from:
                raise RegistryError(
                    f"the champion moved to {current.name} while the rollback was being checked; nothing changed"
                )
            _require_artifact(target)
            reasons = [*current.decision_reasons, f"rolled back by {actor or 'unknown'}: {reason}"]
            _update(con, current.version, status="revoked", decision_reasons=dumps(reasons))
            event(
                con,
                "version.revoked",
                current.version,
                run_id,
                actor,
                {"reason": reason, "rollback_to": target.version},
            )
            _move_alias(con, CHAMPION, target.version, actor, reason, run_id)
            event(
                con,
                "rollback",
                target.version,
                run_id,
                actor,
                {"from": current.version, "to": target.version, "reason": reason},
            )
            return Rollback(current.version, target.version)

    def gc_candidates(self, older_than: datetime) -> list[Version]:
        """Rejected versions last changed before ``older_than`` (naive UTC) whose files may go.

        Never a promoted, revoked or candidate version, and never files that another, non-rejected
        version points at too (a rerun can register the same content-keyed directory again).
        """
        with self.transaction() as con:
            return fetch(
                con,
                Version,
                f"{_SELECT} WHERE v.status = 'rejected' AND v.updated_at < ? AND v.artifact_uri IS NOT NULL "
                "AND v.artifact_uri NOT IN (SELECT artifact_uri FROM adapter_versions "
                "WHERE status <> 'rejected' AND artifact_uri IS NOT NULL) "
                "AND a.alias IS NULL ORDER BY v.version",
                [older_than],
            )

    def revoke_version(self, version: int | str, actor: str | None, reason: str) -> Version:
        """Revoke a version that is not the champion (roll back first to revoke the champion)."""
        with self.transaction() as con:
            current = _get(con, version)
            if current.is_champion:
                raise RegistryError(f"{current.name} is the champion; use rollback to revoke it")
            if current.status == "revoked":
                raise RegistryError(f"{current.name} is already revoked")
            reasons = [*current.decision_reasons, f"revoked by {actor or 'unknown'}: {reason}"]
            _update(con, current.version, status="revoked", decision_reasons=dumps(reasons))
            event(con, "version.revoked", current.version, None, actor, {"reason": reason})
            return _get(con, current.version)


# --- helpers (inside the caller's transaction) ---------------------------------------------------
def _get(con: Con, version: int | str) -> Version:
    number = parse_version(version)
    rows = fetch(con, Version, f"{_SELECT} WHERE v.version = ?", [number])
    if not rows:
        raise RegistryError(f"no version {format_version(number)}")
    return rows[0]


def _update(con: Con, version: int, **columns: Any) -> None:
    sets = ", ".join(f"{name} = ?" for name in columns)
    con.execute(
        f"UPDATE adapter_versions SET {sets}, updated_at = ? WHERE version = ?",
        [*columns.values(), utcnow(), version],
    )


def _require_artifact(version: Version) -> None:
    """Refuse a champion whose files are not there as recorded: a checksum must be recorded and the
    directory must match it (every way to the champion alias passes here, inside its transaction)."""
    from storage.artifacts import ArtifactError, verify_uri

    if version.artifact_sha256 is None:
        raise RegistryError(f"{version.name} has no artifact recorded; it cannot be promoted")
    try:
        verify_uri(version.artifact_uri, version.artifact_sha256, label=version.name)
    except ArtifactError as exc:
        raise RegistryError(f"{version.name} cannot be the champion: {exc}") from exc


def _move_alias(
    con: Con, alias: str, version: int, actor: str | None, reason: str | None, run_id: str | None = None
) -> None:
    old = con.execute("SELECT version FROM aliases WHERE alias = ?", [alias]).fetchone()
    con.execute(
        "INSERT INTO aliases VALUES (?, ?, ?) ON CONFLICT (alias) DO UPDATE SET version = excluded.version, "
        "updated_at = excluded.updated_at",
        [alias, version, utcnow()],
    )
    event(
        con,
        "alias.moved",
        version,
        run_id,
        actor,
        {"alias": alias, "from": old[0] if old else None, "to": version, "reason": reason},
    )


def _rollback_target(con: Con, to: int | str | None) -> tuple[Version, Version]:
    alias = con.execute("SELECT version FROM aliases WHERE alias = ?", [CHAMPION]).fetchone()
    if alias is None:
        raise RegistryError("there is no champion, so nothing to roll back")
    current = _get(con, alias[0])
    if to is not None:
        target = _get(con, to)
        if target.version == current.version:
            raise RegistryError(f"{target.name} is already the champion")
        if target.status != "promoted":
            hint = "promote --force" if target.status in ("revoked", "rejected") else "promote"
            raise RegistryError(f"cannot roll back to {target.name}: it is {target.status} (use {hint})")
        return current, target
    previous = _previous_champion(con, current.version)
    if previous is None:
        raise RegistryError(
            f"no earlier promoted version to roll back to from {current.name}; "
            "name a version with `to` or promote one"
        )
    return current, _get(con, previous)


def _previous_champion(con: Con, current: int) -> int | None:
    """The most recent earlier champion that is still promoted (read from the alias history)."""
    rows = con.execute("SELECT detail FROM events WHERE kind = 'alias.moved' ORDER BY id DESC").fetchall()
    promoted = {
        r[0] for r in con.execute("SELECT version FROM adapter_versions WHERE status = 'promoted'").fetchall()
    }
    for (detail,) in rows:
        moved = json.loads(detail)
        if moved.get("alias") == CHAMPION and moved["to"] != current and moved["to"] in promoted:
            return int(moved["to"])
    return None
