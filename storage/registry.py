"""The DuckDB registry: runs, the LLM cache, evaluations and the audit log here; documents, chunks
and QA pairs from :class:`storage.corpus.CorpusMixin`; adapter versions and aliases from
:class:`storage.versions.VersionsMixin`.

Every public method runs ONE short transaction (see :mod:`storage.db` for why and how lock waits
are retried) and every state change writes an event row in that same transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.bank import BankMixin
from storage.corpus import CorpusMixin
from storage.db import bulk_insert, dumps, event, filters, unique, utcnow, where
from storage.migrations import migrate
from storage.records import (
    CacheEntry,
    Chunk,
    Document,
    Evaluation,
    Event,
    QAFailure,
    QAPair,
    QuarantineEntry,
    RegistryError,
    RegistryLockedError,
    Rollback,
    Run,
    Version,
    format_version,
    parse_version,
)
from storage.versions import VersionsMixin

if TYPE_CHECKING:
    from storage.settings import Settings

__all__ = [
    "CacheEntry",
    "Chunk",
    "Document",
    "Evaluation",
    "Event",
    "QAFailure",
    "QAPair",
    "QuarantineEntry",
    "Registry",
    "RegistryError",
    "RegistryLockedError",
    "Rollback",
    "Run",
    "Version",
    "format_version",
    "parse_version",
]


class Registry(CorpusMixin, VersionsMixin, BankMixin):
    """The project's registry in one DuckDB file.  Cheap to construct; holds no open connection."""

    def __init__(self, path: Path | str, lock_timeout_s: float = 60.0) -> None:
        super().__init__(path, lock_timeout_s)
        with self.transaction() as con:
            #: migration versions applied by this constructor (empty when the schema was current)
            self.migrated: list[int] = migrate(con)

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        return cls(settings.registry_path, lock_timeout_s=settings.registry_lock_timeout_s)

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    # --- runs ---------------------------------------------------------------------------------
    def start_run(self, params: dict[str, Any] | None = None, flow_run_id: str | None = None) -> str:
        """Record a pipeline run as 'running'; return its id (uuid4 hex)."""
        run_id = uuid.uuid4().hex
        with self.transaction() as con:
            con.execute(
                "INSERT INTO runs (run_id, flow_run_id, started_at, status, params) VALUES (?, ?, ?, 'running', ?)",
                [run_id, flow_run_id, utcnow(), dumps(params or {})],
            )
            event(con, "run.started", run_id=run_id, detail={"flow_run_id": flow_run_id})
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any] | None = None) -> None:
        with self.transaction() as con:
            if not con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
                raise RegistryError(f"no run {run_id}")
            con.execute(
                "UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE run_id = ?",
                [utcnow(), status, dumps(summary or {}), run_id],
            )
            event(con, "run.finished", run_id=run_id, detail={"status": status})

    def get_run(self, run_id: str) -> Run | None:
        rows = self.read(Run, "SELECT * FROM runs WHERE run_id = ?", [run_id])
        return rows[0] if rows else None

    def runs(self, limit: int = 20) -> list[Run]:
        """The most recent runs, newest first."""
        return self.read(Run, "SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", [limit])

    # --- LLM cache ----------------------------------------------------------------------------
    def cache_get(self, key: str) -> Any | None:
        return self.cache_get_many([key]).get(key)

    def cache_get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        with self.transaction() as con:
            rows = con.execute(
                "SELECT key, response FROM llm_cache WHERE list_contains(?::VARCHAR[], key)", [list(keys)]
            ).fetchall()
        return {key: json.loads(response) for key, response in rows}

    def cache_put(
        self,
        key: str,
        response: Any,
        model: str | None = None,
        prompt_version: str | None = None,
        tokens: int | None = None,
    ) -> None:
        self.cache_put_many([CacheEntry(key, response, model, prompt_version, tokens)])

    def cache_put_many(self, entries: Iterable[CacheEntry]) -> int:
        """Store responses (a later put for the same key replaces the earlier one)."""
        rows = [
            [e.key, dumps(e.response), e.model, e.prompt_version, e.tokens, utcnow()]
            for e in unique(entries, lambda e: e.key, keep="last")
        ]
        if not rows:
            return 0
        with self.transaction() as con:
            con.execute(
                "DELETE FROM llm_cache WHERE list_contains(?::VARCHAR[], key)", [[r[0] for r in rows]]
            )
            columns = [
                ("key", "VARCHAR"),
                ("response", "JSON"),
                ("model", "VARCHAR"),
                ("prompt_version", "VARCHAR"),
                ("tokens", "INTEGER"),
                ("created_at", "TIMESTAMP"),
            ]
            return bulk_insert(con, "llm_cache", columns, rows)

    # --- evaluations and events ---------------------------------------------------------------
    def record_evaluations(self, rows: Iterable[Evaluation]) -> int:
        now = utcnow()
        values = [
            (r.version, r.model, r.suite, r.mode, r.metric, r.value, r.n, r.ci_low, r.ci_high, r.run_id, now)
            for r in rows
        ]
        columns = [
            ("version", "INTEGER"),
            ("model", "VARCHAR"),
            ("suite", "VARCHAR"),
            ("mode", "VARCHAR"),
            ("metric", "VARCHAR"),
            ("value", "DOUBLE"),
            ("n", "INTEGER"),
            ("ci_low", "DOUBLE"),
            ("ci_high", "DOUBLE"),
            ("run_id", "VARCHAR"),
            ("created_at", "TIMESTAMP"),
        ]
        with self.transaction() as con:
            added = bulk_insert(con, "evaluations", columns, values)
            if added:
                versions = sorted({v[0] for v in values if v[0] is not None})
                event(
                    con,
                    "evaluations.recorded",
                    version=versions[0] if len(versions) == 1 else None,
                    run_id=values[0][9],
                    detail={"count": added},
                )
            return added

    def evaluations(self, version: int | str | None = None, run_id: str | None = None) -> list[Evaluation]:
        clauses, params = filters(version=None if version is None else parse_version(version), run_id=run_id)
        return self.read(Evaluation, f"SELECT * FROM evaluations {where(clauses)} ORDER BY id", params)

    def latest_evaluations(self, version: int | str | None = None) -> list[Evaluation]:
        """Per version, only the rows of its most recent evaluation (a rerun appends a new set; the
        rows of one evaluation are written in one transaction and share their ``created_at``)."""
        params: list[Any] = []
        sql = (
            "SELECT e.* FROM evaluations e JOIN (SELECT version, max(created_at) AS latest FROM evaluations "
            "GROUP BY version) l ON e.version = l.version AND e.created_at = l.latest"
        )
        if version is not None:
            sql += " WHERE e.version = ?"
            params.append(parse_version(version))
        return self.read(Evaluation, sql + " ORDER BY e.version, e.id", params)

    def hold_for_approval(
        self, version: int | str, reasons: list[str], actor: str | None = "gate", run_id: str | None = None
    ) -> None:
        """Leave a candidate undecided with the reasons why (e.g. awaiting a person's approval)."""
        v = parse_version(version)
        with self.transaction() as con:
            row = con.execute("SELECT status FROM adapter_versions WHERE version = ?", [v]).fetchone()
            if row is None:
                raise RegistryError(f"no version v{v}")
            if row[0] != "candidate":
                raise RegistryError(f"v{v} is {row[0]}; only a candidate can await approval")
            con.execute(
                "UPDATE adapter_versions SET decision_reasons = ?, updated_at = ? WHERE version = ?",
                [dumps(list(reasons)), utcnow(), v],
            )
            event(con, "version.awaiting_approval", v, run_id, actor, {"reasons": reasons})

    def log_event(
        self,
        kind: str,
        version: int | None = None,
        run_id: str | None = None,
        actor: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        with self.transaction() as con:
            return event(con, kind, version, run_id, actor, detail)

    def events(
        self,
        kind: str | None = None,
        version: int | str | None = None,
        run_id: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Audit events in order; with ``limit`` the latest ``limit`` of them. ``kind`` may end in '*'."""
        clauses, params = filters(version=None if version is None else parse_version(version), run_id=run_id)
        if kind is not None:
            clauses.append("kind LIKE ?" if kind.endswith("*") else "kind = ?")
            params.append(kind[:-1] + "%" if kind.endswith("*") else kind)
        sql = f"SELECT * FROM events {where(clauses)} ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return list(reversed(self.read(Event, sql, params)))

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per status in the main tables (for `moral status`)."""
        out: dict[str, dict[str, int]] = {}
        with self.transaction() as con:
            for table in ("documents", "chunks", "qa_pairs", "adapter_versions"):
                rows = con.execute(
                    f"SELECT status, count(*) FROM {table} GROUP BY status ORDER BY status"
                ).fetchall()
                out[table] = {status: int(n) for status, n in rows}
        return out
