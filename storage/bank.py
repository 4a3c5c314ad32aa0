"""The adapter bank in the registry: LoRA adapters a new version's experts may start from.

Two kinds of entries, one list:

* ``version`` entries: every expert of every *promoted* MoRAL version is a LoRA (rows ``e*r:(e+1)*r``
  of its stacked A/B).  They are derived from ``adapter_versions`` at read time, never copied, so a
  version that is later revoked leaves the bank by itself.  Named ``v3/e1`` (version 3, expert 1).
* ``external`` entries: peft LoRA adapter directories a user registered with ``moral bank add``,
  stored in the ``bank_entries`` table (migration 6) after the caller validated them.

storage/ knows nothing of tensors: validation (shapes, base model, targets) happens in
:mod:`tasks.bank`, which passes the facts it checked to :meth:`BankMixin.add_bank_entry`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from storage.db import Database, dumps, event, utcnow
from storage.records import RegistryError

BankSource = Literal["version", "external"]
_VERSION_NAME = re.compile(r"^v\d+/e\d+$")


@dataclass(frozen=True)
class BankEntry:
    """One LoRA in the bank (an expert of a promoted version, or a registered peft adapter)."""

    name: str
    source: BankSource
    path: str  # adapter directory (a MoRAL version's artifact, or the peft adapter's folder)
    base_model_sha256: str | None
    targets: list[str] = field(default_factory=list)  # module-name suffixes it adapts
    rank: int | None = None
    created_at: datetime | None = None
    version: int | None = None  # version entries: the version ...
    expert: int | None = None  # ... and which of its experts
    id: int | None = None  # external entries: the table id
    weights_sha256: str | None = None  # external entries: the weights file's checksum when registered
    artifact_sha256: str | None = None  # version entries: the version's recorded artifact checksum

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "path": self.path,
            "base_model_sha256": self.base_model_sha256,
            "targets": list(self.targets),
            "rank": self.rank,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "version": self.version,
            "expert": self.expert,
            "id": self.id,
            "weights_sha256": self.weights_sha256,
            "artifact_sha256": self.artifact_sha256,
        }


def version_entry_name(version: int, expert: int) -> str:
    return f"v{version}/e{expert}"


def _saved_config(artifact_uri: str) -> dict[str, Any]:
    """Expert count, rank and targets from a version's ``adapter_config.json`` (plain JSON, no tensors);
    empty when the file is missing or unreadable (the loader then reports the problem)."""
    try:
        saved = json.loads((Path(artifact_uri) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: saved[k] for k in ("num_experts", "rank", "target_modules") if k in saved}


class BankMixin(Database):
    """Bank operations of :class:`storage.registry.Registry`."""

    def add_bank_entry(
        self,
        *,
        name: str,
        path: str,
        base_model_sha256: str,
        targets: list[str],
        rank: int,
        weights_sha256: str,
        actor: str | None = None,
    ) -> BankEntry:
        """Register an external (already validated) LoRA adapter; names are unique."""
        name = name.strip()
        if not name:
            raise RegistryError("a bank entry needs a non-empty name")
        if _VERSION_NAME.match(name):
            raise RegistryError(f"'{name}' looks like a version expert's name (vN/eM); choose another")
        if not targets or rank < 1:
            raise RegistryError("a bank entry needs its target modules and a positive rank")
        with self.transaction() as con:
            clash = con.execute(
                "SELECT name, path FROM bank_entries WHERE name = ? OR (path = ? AND weights_sha256 = ?)",
                [name, path, weights_sha256],
            ).fetchone()
            if clash is not None:
                raise RegistryError(
                    f"the bank already holds '{clash[0]}' ({clash[1]}); names and adapters are registered once"
                )
            row = con.execute(
                "INSERT INTO bank_entries (name, source, path, base_model_sha256, targets, rank, weights_sha256, "
                "created_at) VALUES (?, 'external', ?, ?, ?, ?, ?, ?) RETURNING id",
                [name, path, base_model_sha256, dumps(sorted(targets)), rank, weights_sha256, utcnow()],
            ).fetchone()
            assert row is not None
            event(
                con,
                "bank.added",
                actor=actor,
                detail={
                    "id": int(row[0]),
                    "name": name,
                    "path": path,
                    "targets": sorted(targets),
                    "rank": rank,
                },
            )
        return next(e for e in self.bank_entries(source="external") if e.name == name)

    def remove_bank_entry(self, name: str, actor: str | None = None) -> None:
        """Unregister an external entry (the adapter's files are left alone)."""
        with self.transaction() as con:
            row = con.execute("DELETE FROM bank_entries WHERE name = ? RETURNING id", [name]).fetchone()
            if row is None:
                raise RegistryError(f"no external bank entry named '{name}'")
            event(con, "bank.removed", actor=actor, detail={"id": int(row[0]), "name": name})

    def bank_entries(
        self, source: BankSource | None = None, base_model_sha256: str | None = None
    ) -> list[BankEntry]:
        """The bank: experts of promoted MoRAL versions (oldest first), then external entries.

        ``base_model_sha256`` keeps only entries recorded for that base model (an entry that
        recorded none is kept: its shapes are checked when it is loaded).
        """
        out: list[BankEntry] = []
        with self.transaction() as con:
            if source in (None, "version"):
                rows = con.execute(
                    "SELECT version, artifact_uri, base_model_sha256, params, created_at, artifact_sha256 "
                    "FROM adapter_versions "
                    "WHERE status = 'promoted' AND kind = 'moral' AND artifact_uri IS NOT NULL ORDER BY version"
                ).fetchall()
                for version, uri, sha, params, created, artifact_sha in rows:
                    params = json.loads(params) if isinstance(params, str) else (params or {})
                    # The saved config wins: a warm-started version keeps its parent's expert count.
                    params = {**params, **_saved_config(uri)}
                    experts = int(params.get("num_experts") or 0)
                    targets = params.get("target_modules") or []
                    for e in range(experts):
                        out.append(
                            BankEntry(
                                name=version_entry_name(version, e),
                                source="version",
                                path=uri,
                                base_model_sha256=sha,
                                targets=list(targets),
                                rank=params.get("rank"),
                                created_at=created,
                                version=version,
                                expert=e,
                                artifact_sha256=artifact_sha,
                            )
                        )
            if source in (None, "external"):
                rows = con.execute(
                    "SELECT id, name, path, base_model_sha256, targets, rank, weights_sha256, created_at "
                    "FROM bank_entries ORDER BY id"
                ).fetchall()
                for id_, name, path, sha, targets, rank, wsha, created in rows:
                    out.append(
                        BankEntry(
                            name=name,
                            source="external",
                            path=path,
                            base_model_sha256=sha,
                            targets=json.loads(targets) if isinstance(targets, str) else list(targets),
                            rank=rank,
                            created_at=created,
                            id=int(id_),
                            weights_sha256=wsha,
                        )
                    )
        if base_model_sha256 is not None:
            out = [e for e in out if e.base_model_sha256 in (None, base_model_sha256)]
        return out
