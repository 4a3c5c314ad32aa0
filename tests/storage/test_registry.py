"""The DuckDB registry on real files: schema, idempotent inserts, version lifecycle, and two
processes writing at once."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import duckdb
import pytest

from storage import migrations
from storage.records import Chunk, Evaluation, QAPair, RegistryError, RegistryLockedError
from storage.registry import Registry, format_version, parse_version
from tests.artifacts import adapter_files

SPAWN = mp.get_context("spawn")  # fork would copy this process's DuckDB state and locks


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry.duckdb")


def _candidate(reg: Registry, **kw) -> int:
    return reg.create_version(**adapter_files(reg.path.parent / "adapters"), **kw)


# --- schema ---------------------------------------------------------------------------------------
def test_migrations_apply_once_and_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "r.duckdb"
    every = [m.version for m in migrations.MIGRATIONS]
    assert Registry(path).migrated == every
    assert Registry(path).migrated == []
    con = duckdb.connect(str(path))
    try:
        assert migrations.migrate(con) == []
        names = con.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
        assert names == [(m.version, m.name) for m in migrations.MIGRATIONS]
        nxt = every[-1] + 1
        extra = migrations.Migration(nxt, "add a column", "ALTER TABLE runs ADD COLUMN note TEXT")
        assert migrations.migrate(con, [*migrations.MIGRATIONS, extra]) == [nxt]
        assert migrations.migrate(con, [*migrations.MIGRATIONS, extra]) == []
        with pytest.raises(migrations.MigrationError, match="unknown to this code"):
            migrations.migrate(con)  # the database is now newer than MIGRATIONS
    finally:
        con.close()


def test_migration_list_must_be_ascending_and_unique() -> None:
    step = migrations.Migration(1, "a", "SELECT 1")
    with pytest.raises(migrations.MigrationError):
        migrations.validate([step, step])
    with pytest.raises(migrations.MigrationError):
        migrations.validate([migrations.Migration(2, "b", "SELECT 1"), step])


def test_failed_migration_leaves_no_trace(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    nxt = migrations.MIGRATIONS[-1].version + 1
    bad = migrations.Migration(nxt, "broken", "CREATE TABLE ok_table (a INT); THIS IS NOT SQL")
    con.execute("BEGIN")
    with pytest.raises(duckdb.Error):
        migrations.migrate(con, [*migrations.MIGRATIONS, bad])
    con.execute("ROLLBACK")
    assert migrations.applied(con) == []
    con.close()


def test_parse_and_format_version() -> None:
    assert parse_version(3) == parse_version("3") == parse_version("v3") == parse_version(" V3 ") == 3
    assert format_version(3) == "v3"
    for bad in ("three", "v", "v-1", 0, True, "3.5", None):
        with pytest.raises(RegistryError, match="not a version"):
            parse_version(bad)  # type: ignore[arg-type]


# --- runs, documents, chunks, pairs ---------------------------------------------------------------
def test_runs(reg: Registry) -> None:
    run = reg.start_run({"source": "docs"}, flow_run_id="f1")
    assert len(run) == 32 and reg.get_run(run).status == "running"
    reg.finish_run(run, "completed", {"new_docs": 2})
    got = reg.get_run(run)
    assert got.status == "completed" and got.summary == {"new_docs": 2} and got.params == {"source": "docs"}
    assert got.finished_at is not None and got.finished_at >= got.started_at
    assert reg.get_run("nope") is None
    with pytest.raises(RegistryError):
        reg.finish_run("nope", "failed")
    assert [e.kind for e in reg.events(run_id=run)] == ["run.started", "run.finished"]


def test_documents_rename_retire_reactivate(reg: Registry) -> None:
    run = reg.start_run()
    assert (
        reg.upsert_document("sha-a", "docs/a.md", source_root="docs", kind="md", size=10, run_id=run) == "new"
    )
    assert reg.upsert_document("sha-a", "docs/a.md", run_id=run) == "unchanged"
    assert reg.upsert_document("sha-a", "docs/renamed.md", run_id=run) == "renamed"
    doc = reg.document_by_sha("sha-a")
    assert doc.path == "docs/renamed.md" and doc.kind == "md" and doc.status == "active"
    chunks = [Chunk.new("sha-a", i, f"text {i}") for i in range(3)]
    reg.add_chunks(chunks, run)
    pairs = [QAPair.new(c.chunk_id, "sha-a", f"Q{i}?", "A", "train") for i, c in enumerate(chunks)]
    reg.add_qa_pairs(pairs)
    reg.mark_duplicates([(pairs[1].qa_id, pairs[0].qa_id)])
    reg.exclude_pair(pairs[2].qa_id, "bad")

    assert reg.retire_document("sha-a", run, "deleted") == {"chunks": 3, "qa_pairs": 2}
    assert reg.retire_document("sha-a", run) == {"chunks": 0, "qa_pairs": 0}  # idempotent
    assert reg.document_by_sha("sha-a").status == "retired" and reg.documents("active") == []
    assert reg.chunks(doc_id="sha-a") == [] and reg.qa_pairs() == []
    assert {p.status for p in reg.qa_pairs(status=None)} == {"retired", "excluded"}

    assert reg.upsert_document("sha-a", "docs/back.md", run_id=run) == "reactivated"
    assert len(reg.chunks(doc_id="sha-a")) == 3
    assert {p.qa_id: p.status for p in reg.qa_pairs(status=None)} == {
        pairs[0].qa_id: "active",
        pairs[1].qa_id: "duplicate",
        pairs[2].qa_id: "excluded",
    }
    with pytest.raises(RegistryError, match="no document"):
        reg.retire_document("missing")


def test_quarantine(reg: Registry) -> None:
    reg.quarantine("bad.pdf", "sha-bad", "encrypted PDF")
    reg.quarantine("bad.pdf", "sha-bad", "encrypted PDF, again")  # same file: one open entry
    reg.quarantine("unreadable.bin", None, "permission denied")
    entries = reg.quarantined()
    assert [(e.path, e.reason) for e in entries] == [
        ("bad.pdf", "encrypted PDF, again"),
        ("unreadable.bin", "permission denied"),
    ]
    assert reg.document_by_sha("sha-bad").status == "quarantined"
    # The same bytes later ingest fine (a limit was raised): the entry is resolved.
    assert reg.upsert_document("sha-bad", "bad.pdf") == "reactivated"
    assert [e.path for e in reg.quarantined()] == ["unreadable.bin"]
    assert len(reg.quarantined(open_only=False)) == 2
    # Quarantining bytes that are already an active document does not demote it.
    reg.quarantine("copy.pdf", "sha-bad", "odd")
    assert reg.document_by_sha("sha-bad").status == "active"


def test_chunks_idempotent_and_waiting_for_qa(reg: Registry) -> None:
    chunks = [Chunk.new("d", i, f"chunk {i}", page=i + 1, n_tokens=2) for i in range(4)]
    assert chunks[0].chunk_id == Chunk.new("d", 0, "chunk 0").chunk_id  # deterministic
    assert reg.add_chunks(chunks + chunks[:1]) == 4
    assert reg.add_chunks(chunks) == 0
    assert [c.idx for c in reg.chunks()] == [0, 1, 2, 3] and reg.chunks()[1].page == 2
    reg.add_qa_pairs([QAPair.new(chunks[0].chunk_id, "d", "Q?", "A", "dev")])
    reg.mark_chunks_qa_done([chunks[1].chunk_id])  # yielded no valid pair: not retried
    assert reg.record_qa_failure(chunks[2].chunk_id, "timeout") == 1
    assert reg.record_qa_failure(chunks[2].chunk_id, "timeout again", run_id="r") == 2
    assert [c.idx for c in reg.chunks_without_qa()] == [2, 3]
    assert [c.idx for c in reg.chunks_without_qa(max_attempts=2)] == [3]
    assert [c.idx for c in reg.chunks_without_qa(limit=1)] == [2]
    assert [(f.attempts, f.error) for f in reg.qa_failures()] == [(2, "timeout again")]
    reg.mark_chunks_qa_done([chunks[2].chunk_id])  # success clears the failure
    assert reg.qa_failures() == [] and [c.idx for c in reg.chunks_without_qa()] == [3]
    reg.record_qa_failure(chunks[3].chunk_id, "x")
    assert reg.clear_qa_failures([chunks[3].chunk_id]) == 1


def test_bulk_insert_is_fast(reg: Registry) -> None:
    chunks = [Chunk.new("big", i, f"chunk number {i} " * 20) for i in range(5000)]
    start = time.perf_counter()
    assert reg.add_chunks(chunks) == 5000
    assert time.perf_counter() - start < 3.0  # executemany would take ~10 s


def test_qa_pairs_dedup_and_filters(reg: Registry) -> None:
    c = Chunk.new("d", 0, "text")
    reg.add_chunks([c])
    p1 = QAPair.new(
        c.chunk_id, "d", "What is X?", "Y", "train", generator="g", prompt_version="p1", run_id="r1"
    )
    p2 = QAPair.new(c.chunk_id, "d", "what is x", "y!", "train")  # same normalised text -> same id
    p3 = QAPair.new(c.chunk_id, "d", "What's X, really?", "Y", "eval", run_id="r2")
    assert p1.qa_id == p2.qa_id and p1.question_norm == "what is x"
    assert reg.add_qa_pairs([p1, p2, p3]) == 2 and reg.add_qa_pairs([p1]) == 0
    assert [p.qa_id for p in reg.qa_pairs(split="eval")] == [p3.qa_id]
    assert [p.qa_id for p in reg.qa_pairs(run_id="r1")] == [p1.qa_id]
    assert reg.qa_pairs(run_id="r1")[0].generator == "g"
    assert reg.existing_question_norms() == {"what is x": p1.qa_id, "what s x really": p3.qa_id}
    assert reg.mark_duplicates([(p3.qa_id, p1.qa_id)]) == 1
    assert reg.qa_pairs(status="duplicate")[0].duplicate_of == p1.qa_id
    assert reg.qa_pairs(doc_id="d") == reg.qa_pairs(ids=[p1.qa_id])
    with pytest.raises(RegistryError):
        reg.exclude_pair("missing")


def test_llm_cache(reg: Registry) -> None:
    assert reg.cache_get("k1") is None
    reg.cache_put("k1", {"pairs": [{"q": "Q", "a": "A"}]}, model="m", prompt_version="v1", tokens=42)
    assert reg.cache_get("k1") == {"pairs": [{"q": "Q", "a": "A"}]}
    reg.cache_put("k1", {"pairs": []})  # replaced
    assert reg.cache_get("k1") == {"pairs": []}
    from storage.records import CacheEntry

    assert reg.cache_put_many([CacheEntry(f"k{i}", [i]) for i in range(2, 6)]) == 4
    assert reg.cache_get_many(["k2", "k5", "nope"]) == {"k2": [2], "k5": [5]}


# --- versions -------------------------------------------------------------------------------------
def test_version_numbering_and_set_once_fields(reg: Registry) -> None:
    assert reg.list_versions() == [] and reg.champion() is None
    v1 = reg.create_version(run_id="r", base_model="smol", data_hash="h", params={"lr": 1e-3})
    v2 = _candidate(reg, parent_version=v1, kind="lora")
    assert (v1, v2) == (1, 2)
    with pytest.raises(RegistryError, match="no version v9"):
        reg.create_version(parent_version=9)
    reg.set_version_artifact(v1, "/adapters/v1", "a" * 64)
    with pytest.raises(RegistryError, match="already has an artifact"):
        reg.set_version_artifact(v1, "/elsewhere", "b" * 64)
    reg.set_version_metrics("v1", {"ra": 0.5})
    with pytest.raises(RegistryError, match="set once"):
        reg.set_version_metrics(1, {"ra": 0.9})
    got = reg.get_version("v1")
    assert got.metrics == {"ra": 0.5} and got.params == {"lr": 0.001} and got.name == "v1"
    assert reg.get_version(2).parent_version == 1 and reg.get_version(2).kind == "lora"
    with pytest.raises(RegistryError, match="no version v7"):
        reg.get_version(7)


def test_decisions_and_refusals(reg: Registry) -> None:
    bare = reg.create_version()
    with pytest.raises(RegistryError, match="no artifact"):
        reg.decide_version(bare, "promoted", ["good"])
    reg.decide_version(bare, "rejected", ["training failed"])
    with pytest.raises(RegistryError, match="only a candidate can be decided"):
        reg.decide_version(bare, "promoted", ["again"])
    v2 = _candidate(reg)
    with pytest.raises(RegistryError, match="'promoted' or 'rejected'"):
        reg.decide_version(v2, "revoked", [])  # type: ignore[arg-type]
    promoted = reg.decide_version(v2, "promoted", ["gain +0.3"], run_id="r9")
    assert (
        promoted.status == "promoted" and promoted.is_champion and promoted.decision_reasons == ["gain +0.3"]
    )
    assert reg.champion() == v2 and reg.aliases() == {"champion": v2}
    kinds = [(e.kind, e.version) for e in reg.events(version=v2)]
    assert kinds[-2:] == [("version.promoted", v2), ("alias.moved", v2)]
    assert reg.events(kind="alias.moved")[-1].detail == {
        "alias": "champion",
        "from": None,
        "to": v2,
        "reason": "promoted by the gate",
    }
    with pytest.raises(RegistryError, match="already the champion"):
        reg.promote(v2, "ops", "again")
    with pytest.raises(RegistryError, match="pass force=True"):
        reg.promote(bare, "ops", "override")  # rejected
    with pytest.raises(RegistryError, match="champion"):
        reg.set_alias("champion", bare)
    reg.set_alias("staging", bare, actor="ops")
    assert reg.aliases() == {"champion": v2, "staging": bare}
    assert [v.is_champion for v in reg.list_versions()] == [False, True]
    assert [v.version for v in reg.list_versions(status="rejected")] == [bare]


def test_promotion_is_one_transaction(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.versions

    v = _candidate(reg)
    before = len(reg.events())

    def boom(*args, **kwargs):
        raise RuntimeError("crash while moving the alias")

    monkeypatch.setattr(storage.versions, "_move_alias", boom)
    with pytest.raises(RuntimeError):
        reg.decide_version(v, "promoted", ["ok"])
    # Nothing of the half-done promotion survived: status, alias and events all rolled back.
    assert reg.get_version(v).status == "candidate" and reg.champion() is None
    assert len(reg.events()) == before


def test_rollback_and_revoked_versions(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="no champion"):
        reg.rollback(actor="ops")
    v1, v2, v3 = (_candidate(reg) for _ in range(3))
    reg.decide_version(v1, "promoted", ["first"])
    with pytest.raises(RegistryError, match="no earlier promoted version"):
        reg.rollback(actor="ops")
    reg.decide_version(v2, "promoted", ["better"])
    reg.decide_version(v3, "promoted", ["even better"])

    result = reg.rollback(actor="ops", reason="v3 answers badly")
    assert (result.from_version, result.to_version) == (v3, v2) and reg.champion() == v2
    assert reg.get_version(v3).status == "revoked"
    assert reg.get_version(v3).decision_reasons[-1] == "rolled back by ops: v3 answers badly"
    assert reg.events(kind="rollback")[-1].detail["from"] == v3

    # A revoked version can never come back through a refresh (decide) nor a plain rollback.
    with pytest.raises(RegistryError, match="only a candidate"):
        reg.decide_version(v3, "promoted", ["gate says yes"])
    with pytest.raises(RegistryError, match="revoked"):
        reg.rollback(to=v3, actor="ops")
    with pytest.raises(RegistryError, match="pass force=True"):
        reg.promote(v3, "ops", "retry")

    v4 = _candidate(reg)
    with pytest.raises(RegistryError, match="candidate"):
        reg.rollback(to=v4, actor="ops")
    result = reg.rollback(to="v1", actor="ops", reason="back to the first")
    assert (result.from_version, result.to_version) == (v2, v1) and reg.champion() == v1
    with pytest.raises(RegistryError, match="already the champion"):
        reg.rollback(to=v1)
    # Only v1 is still promoted: nothing earlier to go back to.
    with pytest.raises(RegistryError, match="no earlier promoted version"):
        reg.rollback()

    # An operator can deliberately reinstate a revoked version.
    assert reg.promote(v3, "ops", "fixed upstream", force=True).is_champion
    assert reg.rollback().to_version == v1  # the champion before v3 was v1
    with pytest.raises(RegistryError, match="use rollback"):
        reg.revoke_version(v1, "ops", "bad")
    assert reg.revoke_version(v4, "ops", "never mind").status == "revoked"


def test_evaluations_and_events(reg: Registry) -> None:
    v = _candidate(reg)
    rows = [
        Evaluation(v, "candidate", "delta", "closed", "ra", 0.6, 20, 0.4, 0.8, run_id="r"),
        Evaluation(v, "base", "holdout", "open", "nll", 4.6, 40),
    ]
    assert reg.record_evaluations(rows) == 2
    got = reg.evaluations(v)
    assert [(e.model, e.metric, e.value, e.ci_high) for e in got] == [
        ("candidate", "ra", 0.6, 0.8),
        ("base", "nll", 4.6, None),
    ]
    assert reg.evaluations(version=99) == []
    event_id = reg.log_event("note", version=v, actor="me", detail={"k": 1})
    assert reg.events(limit=1)[0].id == event_id and reg.events(kind="version.*")[0].kind == "version.created"
    assert reg.counts()["adapter_versions"] == {"candidate": 1}


# --- several processes ----------------------------------------------------------------------------
def _writer(path: str, tag: str, n: int) -> list[int]:
    reg = Registry(path)
    run = reg.start_run({"writer": tag})
    versions = []
    for i in range(n):
        reg.add_chunks([Chunk.new(f"doc-{tag}", i, f"{tag} {i}")], run)
        versions.append(reg.create_version(run_id=run))
    reg.finish_run(run, "completed")
    return versions


def _hold_lock(path: str, ready, seconds: float) -> None:
    con = duckdb.connect(path)
    con.execute("SELECT 1")
    ready.set()
    time.sleep(seconds)
    con.close()


def test_two_writer_processes_serialise(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.duckdb")
    Registry(path)
    with SPAWN.Pool(2) as pool:
        results = pool.starmap(_writer, [(path, "a", 6), (path, "b", 6)])
    numbers = sorted(results[0] + results[1])
    assert numbers == list(range(1, 13))  # unique, gap-free
    reg = Registry(path)
    assert len(reg.chunks(status=None)) == 12
    assert {r.status for r in reg.runs()} == {"completed"}


def test_reader_waits_for_a_busy_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.duckdb")
    reg = Registry(path)
    _candidate(reg)
    ready = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_lock, args=(path, ready, 1.0))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RegistryLockedError, match="locked by another process"):
            Registry(path, lock_timeout_s=0.2).list_versions()
        start = time.perf_counter()
        assert [v.version for v in reg.list_versions()] == [1]  # waits, then reads
        assert time.perf_counter() - start > 0.2
    finally:
        holder.join(30)
    assert holder.exitcode == 0


def test_from_settings_uses_the_data_home(settings) -> None:
    import storage

    reg = storage.Registry.from_settings(settings)
    assert reg.path == settings.registry_path and reg.lock_timeout_s == settings.registry_lock_timeout_s
    assert storage.parse_version("v2") == 2


def test_lineage_records_the_pairs_each_version_trained_on(reg: Registry) -> None:
    v1 = reg.create_version(run_id="r1", trained_pairs={"qa-a": "delta", "qa-b": "delta"})
    v2 = reg.create_version(run_id="r2", parent_version=v1, trained_pairs={"qa-c": "delta", "qa-a": "replay"})
    assert reg.trained_pairs(v1) == {"qa-a": "delta", "qa-b": "delta"}
    assert reg.trained_pairs(f"v{v2}") == {"qa-c": "delta", "qa-a": "replay"}
    # Across versions a pair counts once; 'delta' wins over 'replay' (the role it was first learned in).
    assert reg.trained_pairs() == {"qa-a": "delta", "qa-b": "delta", "qa-c": "delta"}
    assert reg.trained_pairs(99) == {}


def test_migration_7_gives_every_pair_a_fact_id_and_rederives_question_keys(tmp_path):
    """A registry written before fact ids (schema 6): opened by this release, its pairs get their
    fact ids and question keys under the one normalisation; splits and ids are kept."""
    import duckdb

    from storage import migrations
    from storage.records import fact_id_for

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrations.migrate(con, [m for m in migrations.MIGRATIONS if m.version < 7])
    con.execute(
        "INSERT INTO qa_pairs (qa_id, chunk_id, doc_id, question, answer, question_norm, split, created_at) "
        "VALUES ('q1', 'c1', 'd1', 'What is the price, 1,150 euros?', '2.4 kg', 'what is the price 1 150 euros', "
        "'eval', now())"
    )
    con.close()
    reg = Registry(path)
    [p] = reg.qa_pairs()
    assert p.fact_id == fact_id_for("d1", "2.4 kg") and p.split == "eval" and p.qa_id == "q1"
    assert reg.existing_question_norms() == {"what is the price 1150 euros": "q1"}


def test_migration_8_keeps_every_pair_and_allows_superseded(tmp_path):
    """A registry written before fingerprints (schema 7): ``qa_pairs`` is rebuilt for the wider
    status list with every row, column and index kept; chunks get an empty fingerprint (counted as
    on an old generation)."""
    import duckdb

    from storage import migrations

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrations.migrate(con, [m for m in migrations.MIGRATIONS if m.version < 8])
    con.execute(
        "INSERT INTO chunks (chunk_id, doc_id, idx, text, qa_done, created_at) VALUES ('c1', 'd1', 0, 't', true, now())"
    )
    for qa_id, status in (("q1", "active"), ("q2", "excluded"), ("q3", "duplicate")):
        con.execute(
            "INSERT INTO qa_pairs (qa_id, chunk_id, doc_id, question, answer, question_norm, split, status, "
            "fact_id, created_at) VALUES (?, 'c1', 'd1', 'What is it?', '2.4 kg', 'what is it', 'train', ?, 'f', now())",
            [qa_id, status],
        )
    before = con.execute("SELECT * FROM qa_pairs ORDER BY qa_id").fetchall()
    con.close()
    reg = Registry(path)
    assert reg.migrated == [8]
    with reg.transaction() as con:
        assert con.execute("SELECT * FROM qa_pairs ORDER BY qa_id").fetchall() == before
        indexes = {
            r[0]
            for r in con.execute(
                "SELECT index_name FROM duckdb_indexes() WHERE table_name = 'qa_pairs'"
            ).fetchall()
        }
        assert indexes == {"qa_pairs_chunk", "qa_pairs_doc", "qa_pairs_fact"}
        con.execute("UPDATE qa_pairs SET status = 'superseded' WHERE qa_id = 'q1'")
        with pytest.raises(duckdb.ConstraintException):
            con.execute("UPDATE qa_pairs SET status = 'gone' WHERE qa_id = 'q1'")
    assert [c.qa_fingerprint for c in reg.chunks()] == [None]
    assert [c.chunk_id for c in reg.chunks_on_old_fingerprint("any")] == ["c1"]


def test_every_way_to_the_champion_verifies_the_files(reg: Registry) -> None:
    """The gate's decision, a manual promotion, pointing the alias and a rollback all refuse a version
    whose files no longer match the recorded checksum, and change nothing."""
    v1, v2 = _candidate(reg), _candidate(reg)
    reg.decide_version(v1, "promoted", ["gain"])
    reg.decide_version(v2, "rejected", ["no gain"])
    v3 = _candidate(reg)
    tampered = Path(reg.get_version(v3).artifact_uri) / "adapter_config.json"
    tampered.write_text('{"changed": true}\n')
    before = (reg.aliases(), [v.status for v in reg.list_versions()], len(reg.events()))
    with pytest.raises(RegistryError, match="cannot be the champion"):
        reg.decide_version(v3, "promoted", ["gain"])
    (Path(reg.get_version(v2).artifact_uri) / "adapter_config.json").unlink()
    with pytest.raises(RegistryError, match="cannot be the champion"):
        reg.promote(v2, "ops", "override", force=True)
    assert (reg.aliases(), [v.status for v in reg.list_versions()], len(reg.events())) == before
    # A promoted version whose files went away: neither the alias nor a rollback may point at it.
    v4 = _candidate(reg)
    reg.decide_version(v4, "promoted", ["gain"])
    assert reg.champion() == v4
    (Path(reg.get_version(v1).artifact_uri) / "adapter_config.json").write_text("{}\n")
    with pytest.raises(RegistryError, match="cannot be the champion"):
        reg.set_alias("champion", v1)
    with pytest.raises(RegistryError, match="cannot be the champion"):
        reg.rollback(to=v1, actor="ops", reason="v4 regressed")
    assert reg.champion() == v4 and reg.get_version(v4).status == "promoted"
