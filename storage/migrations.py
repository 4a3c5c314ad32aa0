"""Versioned schema migrations for the DuckDB registry.

Modelled on sqlite-utils' ``migrations.py``: a typed list of numbered steps, a ``schema_version``
table that records which ran, and one transaction (opened by the caller) for the whole upgrade so a
crash never leaves half a schema.  Migrations are append-only: never edit a released one, add a new
step instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

Step = str | Callable[[duckdb.DuckDBPyConnection], None]


@dataclass(frozen=True)
class Migration:
    """One schema step: ``sql`` (statements separated by ``;``) or a function of the connection."""

    version: int
    name: str
    step: Step

    def apply(self, con: duckdb.DuckDBPyConnection) -> None:
        if callable(self.step):
            self.step(con)
            return
        for statement in self.step.split(";"):
            if statement.strip():
                con.execute(statement)


_STATUS_DOC = "'active', 'retired', 'quarantined'"
_STATUS_QA = "'active', 'duplicate', 'excluded', 'retired'"  # migration 8 adds 'superseded'
_STATUS_VERSION = "'candidate', 'promoted', 'rejected', 'revoked'"

# Ids are text where they are deterministic hashes (documents, chunks, pairs) so re-running a stage
# inserts nothing new; append-only logs (events, evaluations, quarantine) use sequences.
# No foreign keys: DuckDB rewrites updated rows as delete+insert and FK checks then misfire.
_INITIAL = f"""
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, flow_run_id TEXT, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP,
    status TEXT NOT NULL, params JSON, summary JSON
);
CREATE TABLE documents (
    doc_id TEXT PRIMARY KEY, path TEXT NOT NULL, source_root TEXT, kind TEXT, size BIGINT,
    status TEXT NOT NULL CHECK (status IN ({_STATUS_DOC})), reason TEXT,
    first_run TEXT, last_run TEXT, created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL
);
CREATE SEQUENCE quarantine_seq;
CREATE TABLE quarantine (
    id BIGINT PRIMARY KEY DEFAULT nextval('quarantine_seq'), path TEXT NOT NULL, sha256 TEXT,
    reason TEXT NOT NULL, run_id TEXT, created_at TIMESTAMP NOT NULL, resolved BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE chunks (
    chunk_id TEXT PRIMARY KEY, doc_id TEXT NOT NULL, idx INTEGER NOT NULL, page INTEGER, text TEXT NOT NULL,
    n_tokens INTEGER, status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'retired')),
    qa_done BOOLEAN NOT NULL DEFAULT false, run_id TEXT, created_at TIMESTAMP NOT NULL
);
CREATE INDEX chunks_doc ON chunks (doc_id);
CREATE TABLE qa_pairs (
    qa_id TEXT PRIMARY KEY, chunk_id TEXT NOT NULL, doc_id TEXT NOT NULL, question TEXT NOT NULL,
    answer TEXT NOT NULL, question_norm TEXT NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'dev', 'eval')),
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ({_STATUS_QA})), duplicate_of TEXT,
    generator TEXT, prompt_version TEXT, run_id TEXT, created_at TIMESTAMP NOT NULL
);
CREATE INDEX qa_pairs_chunk ON qa_pairs (chunk_id);
CREATE INDEX qa_pairs_doc ON qa_pairs (doc_id);
CREATE TABLE qa_failures (
    chunk_id TEXT PRIMARY KEY, error TEXT, attempts INTEGER NOT NULL, run_id TEXT,
    created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL
);
CREATE TABLE llm_cache (
    key TEXT PRIMARY KEY, response JSON NOT NULL, model TEXT, prompt_version TEXT, tokens INTEGER,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE adapter_versions (
    version INTEGER PRIMARY KEY, run_id TEXT, parent_version INTEGER, base_model TEXT,
    base_model_sha256 TEXT, data_hash TEXT, params JSON, metrics JSON, artifact_uri TEXT,
    artifact_sha256 TEXT, status TEXT NOT NULL CHECK (status IN ({_STATUS_VERSION})),
    decision_reasons JSON, kind TEXT NOT NULL CHECK (kind IN ('moral', 'lora')),
    created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL
);
CREATE TABLE aliases (alias TEXT PRIMARY KEY, version INTEGER NOT NULL, updated_at TIMESTAMP NOT NULL);
CREATE SEQUENCE evaluations_seq;
CREATE TABLE evaluations (
    id BIGINT PRIMARY KEY DEFAULT nextval('evaluations_seq'), version INTEGER,
    model TEXT NOT NULL CHECK (model IN ('base', 'champion', 'candidate')), suite TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('closed', 'open')), metric TEXT NOT NULL, value DOUBLE,
    n INTEGER, ci_low DOUBLE, ci_high DOUBLE, run_id TEXT, created_at TIMESTAMP NOT NULL
);
CREATE SEQUENCE events_seq;
CREATE TABLE events (
    id BIGINT PRIMARY KEY DEFAULT nextval('events_seq'), "at" TIMESTAMP NOT NULL, kind TEXT NOT NULL,
    version INTEGER, run_id TEXT, actor TEXT, detail JSON
)
"""

#: The registry's schema, in order.  Append new steps; never edit released ones.
# Lineage: which QA pairs each version was trained on ('delta' = new knowledge, 'replay' = earlier pairs).
_VERSION_PAIRS = """
CREATE TABLE version_pairs (
    version INTEGER NOT NULL, qa_id TEXT NOT NULL, role TEXT NOT NULL CHECK (role IN ('delta', 'replay')),
    PRIMARY KEY (version, qa_id)
);
CREATE INDEX version_pairs_qa ON version_pairs (qa_id)
"""

# The adapter bank's external entries: peft LoRA adapters a user registered for the same base model.
# Promoted versions are bank entries too, derived from adapter_versions (never copied here).
_BANK_ENTRIES = """
CREATE SEQUENCE bank_entries_seq;
CREATE TABLE bank_entries (
    id BIGINT PRIMARY KEY DEFAULT nextval('bank_entries_seq'), name TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL CHECK (source IN ('external')), path TEXT NOT NULL,
    base_model_sha256 TEXT NOT NULL, targets JSON NOT NULL, rank INTEGER NOT NULL,
    weights_sha256 TEXT NOT NULL, created_at TIMESTAMP NOT NULL
)
"""


def _facts_and_keys(con: duckdb.DuckDBPyConnection) -> None:
    """Every pair gets its ``fact_id``; question keys are re-derived with the one normalisation of
    ``storage.text`` (decimal points and signs kept, thousands separators unified). Splits are not
    rewritten: the evaluation never scores a pair whose fact was trained unless it is a far paraphrase."""
    from storage.records import fact_id_for
    from storage.text import normalize_question

    con.execute("ALTER TABLE qa_pairs ADD COLUMN fact_id TEXT")
    con.execute("CREATE INDEX qa_pairs_fact ON qa_pairs (fact_id)")  # before the updates (DuckDB)
    rows = con.execute("SELECT qa_id, doc_id, question, answer FROM qa_pairs").fetchall()
    if rows:
        con.execute("CREATE TEMP TABLE _keys (qa_id TEXT, fact_id TEXT, question_norm TEXT)")
        con.executemany(
            "INSERT INTO _keys VALUES (?, ?, ?)",
            [(q, fact_id_for(d, a), normalize_question(text)) for q, d, text, a in rows],
        )
        con.execute(
            "UPDATE qa_pairs SET fact_id = k.fact_id, question_norm = k.question_norm FROM _keys k "
            "WHERE qa_pairs.qa_id = k.qa_id"
        )
        con.execute("DROP TABLE _keys")


def _fingerprints(con: duckdb.DuckDBPyConnection) -> None:
    """Each chunk records the fingerprint of the generation that made its pairs (``NULL``: made
    before fingerprints were recorded, so counted as on an old one), and a pair replaced by a
    regeneration is ``superseded``.  DuckDB cannot alter a CHECK constraint, so ``qa_pairs`` is
    rebuilt from its own DDL with the wider status list, and its indexes recreated."""
    con.execute("ALTER TABLE chunks ADD COLUMN qa_fingerprint TEXT")
    row = con.execute("SELECT sql FROM duckdb_tables() WHERE table_name = 'qa_pairs'").fetchone()
    assert row is not None
    old_check = "'excluded', 'retired')"
    if row[0].count(old_check) != 1:
        raise MigrationError(f"qa_pairs status constraint not as expected: {row[0]}")
    ddl = row[0].replace(old_check, "'excluded', 'retired', 'superseded')")
    ddl = ddl.replace("CREATE TABLE qa_pairs(", "CREATE TABLE qa_pairs__new(", 1)
    indexes = [
        r[0] for r in con.execute("SELECT sql FROM duckdb_indexes() WHERE table_name = 'qa_pairs'").fetchall()
    ]
    con.execute(ddl)
    con.execute("INSERT INTO qa_pairs__new SELECT * FROM qa_pairs")
    con.execute("DROP TABLE qa_pairs")
    con.execute("ALTER TABLE qa_pairs__new RENAME TO qa_pairs")
    for sql in indexes:
        con.execute(sql)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _INITIAL),
    Migration(2, "version lineage: pairs trained on", _VERSION_PAIRS),
    Migration(6, "adapter bank: registered external LoRA adapters", _BANK_ENTRIES),
    Migration(7, "fact ids; question keys under the one answer normalisation", _facts_and_keys),
    Migration(8, "chunk QA generation fingerprints; superseded pairs", _fingerprints),
)


class MigrationError(RuntimeError):
    """The migration list is malformed, or the database is newer than this code."""


def validate(migrations: Sequence[Migration]) -> None:
    """Refuse duplicate or out-of-order version numbers (they would apply ambiguously)."""
    numbers = [m.version for m in migrations]
    if numbers != sorted(set(numbers)) or any(n < 1 for n in numbers):
        raise MigrationError(f"migration versions must be unique, positive and ascending: {numbers}")


def applied(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Versions already applied to this database (empty for a new file)."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()
    if not exists or not exists[0]:
        return []
    return [row[0] for row in con.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]


def migrate(con: duckdb.DuckDBPyConnection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the pending migrations in order, inside the caller's transaction; return their versions.

    Idempotent: a second call applies nothing.  A database that has a version this code does not
    know was written by newer code, and is refused rather than silently misread.
    """
    validate(migrations)
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMP NOT NULL)"
    )
    done = set(applied(con))
    known = {m.version for m in migrations}
    if unknown := sorted(done - known):
        raise MigrationError(f"database has schema versions {unknown} unknown to this code; upgrade it")
    ran: list[int] = []
    for migration in migrations:
        if migration.version in done:
            continue
        migration.apply(con)
        con.execute(
            "INSERT INTO schema_version VALUES (?, ?, ?)",
            [migration.version, migration.name, datetime.now(UTC).replace(tzinfo=None)],
        )
        ran.append(migration.version)
    return ran
