"""The corpus side of the registry: documents (keyed by the sha256 of their bytes), quarantined
files, chunks, QA pairs and failed generations.

Inserts are idempotent (deterministic ids, ``INSERT OR IGNORE``) so re-running a stage is a no-op,
and retiring a document retires its chunks and pairs in the same transaction.

One file (~750 lines) because it is one concept, the corpus tables and their transactions: a
document's upsert, retirement and purge touch its chunks, pairs and failures in the same
transaction, and splitting those methods apart would split each transaction's rules across files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from storage.db import Database, bulk_insert, event, fetch, filters, unique, utcnow, where
from storage.records import Chunk, Document, QAFailure, QAPair, QuarantineEntry, RegistryError


class CorpusMixin(Database):
    """Document, chunk and QA-pair operations of :class:`storage.registry.Registry`."""

    # --- documents ----------------------------------------------------------------------------
    def documents(self, status: str | None = None) -> list[Document]:
        if status is None:
            return self.read(Document, "SELECT * FROM documents ORDER BY path")
        return self.read(Document, "SELECT * FROM documents WHERE status = ? ORDER BY path", [status])

    def document_by_sha(self, sha256: str) -> Document | None:
        rows = self.read(Document, "SELECT * FROM documents WHERE doc_id = ?", [sha256])
        return rows[0] if rows else None

    def upsert_document(
        self,
        doc_id: str,
        path: str | Path,
        *,
        source_root: str | Path | None = None,
        kind: str | None = None,
        size: int | None = None,
        run_id: str | None = None,
    ) -> Literal["new", "renamed", "reactivated", "unchanged"]:
        """Record an active document (``doc_id`` = sha256 of its bytes) and say what changed.

        The same bytes under a new path are the same document ('renamed'). A retired document whose
        bytes come back is 'reactivated' with its chunks and pairs; a quarantined one too (its open
        quarantine entries are resolved).
        """
        with self.transaction() as con:
            return _upsert_document(con, doc_id, str(path), source_root, kind, size, run_id)

    def add_documents(
        self, documents: Sequence[DocumentIn], chunks: Iterable[Chunk] = (), run_id: str | None = None
    ) -> tuple[dict[str, str], int]:
        """Record many active documents and their chunks in ONE transaction; return (doc_id -> what
        changed, as :meth:`upsert_document` says it; how many chunks were new).

        One transaction instead of one per file: a registry write costs a DuckDB connect and commit
        (~0.1 s on a busy machine), which made ingesting a thousand small files take minutes. And a
        document is never recorded without its chunks: a crash in between would otherwise leave an
        'unchanged' document that no later run chunks.
        """
        with self.transaction() as con:
            outcome = {
                d.doc_id: _upsert_document(con, d.doc_id, d.path, d.source_root, d.kind, d.size, run_id)
                for d in documents
            }
            return outcome, _insert_chunks(con, chunks, run_id)

    def retire_document(
        self, doc_id: str, run_id: str | None = None, reason: str = "removed from source"
    ) -> dict[str, int]:
        """Retire a document with its chunks and pairs (excluded pairs stay excluded); return the counts."""
        with self.transaction() as con:
            row = con.execute("SELECT status FROM documents WHERE doc_id = ?", [doc_id]).fetchone()
            if row is None:
                raise RegistryError(f"no document {doc_id}")
            if row[0] == "retired":
                return {"chunks": 0, "qa_pairs": 0}
            con.execute(
                "UPDATE documents SET status = 'retired', reason = ?, last_run = ?, updated_at = ? WHERE doc_id = ?",
                [reason, run_id, utcnow(), doc_id],
            )
            chunks = len(
                con.execute(
                    "UPDATE chunks SET status = 'retired' WHERE doc_id = ? AND status = 'active' RETURNING chunk_id",
                    [doc_id],
                ).fetchall()
            )
            pairs = len(
                con.execute(
                    "UPDATE qa_pairs SET status = 'retired' WHERE doc_id = ? AND status IN ('active', 'duplicate') "
                    "RETURNING qa_id",
                    [doc_id],
                ).fetchall()
            )
            counts = {"chunks": chunks, "qa_pairs": pairs}
            event(
                con, "document.retired", run_id=run_id, detail={"doc_id": doc_id, "reason": reason, **counts}
            )
            return counts

    def quarantine(
        self, path: str | Path, sha256: str | None, reason: str, run_id: str | None = None
    ) -> None:
        """Record a file that could not be ingested; the same bytes are then skipped on later runs.

        A document row with status 'quarantined' is created (or refreshed) for ``sha256`` unless that
        document is already known in another state.
        """
        path, now = str(path), utcnow()
        with self.transaction() as con:
            open_entry = con.execute(
                "SELECT id FROM quarantine WHERE path = ? AND sha256 IS NOT DISTINCT FROM ? AND NOT resolved",
                [path, sha256],
            ).fetchone()
            if open_entry:
                con.execute(
                    "UPDATE quarantine SET reason = ?, run_id = ? WHERE id = ?",
                    [reason, run_id, open_entry[0]],
                )
            else:
                con.execute(
                    "INSERT INTO quarantine (path, sha256, reason, run_id, created_at) VALUES (?, ?, ?, ?, ?)",
                    [path, sha256, reason, run_id, now],
                )
            if sha256 is not None:
                con.execute(
                    "INSERT INTO documents VALUES (?, ?, NULL, NULL, NULL, 'quarantined', ?, ?, ?, ?, ?) "
                    "ON CONFLICT (doc_id) DO UPDATE SET path = excluded.path, reason = excluded.reason, "
                    "last_run = excluded.last_run, updated_at = excluded.updated_at "
                    "WHERE documents.status = 'quarantined'",
                    [sha256, path, reason, run_id, run_id, now, now],
                )
            event(
                con,
                "document.quarantined",
                run_id=run_id,
                detail={"path": path, "sha256": sha256, "reason": reason},
            )

    def quarantined(self, open_only: bool = True) -> list[QuarantineEntry]:
        cond = "WHERE NOT resolved" if open_only else ""
        return self.read(QuarantineEntry, f"SELECT * FROM quarantine {cond} ORDER BY id")

    def resolve_quarantine(
        self, ids: Iterable[int], reason: str, run_id: str | None = None, actor: str | None = None
    ) -> int:
        """Close open quarantine entries (the file was fixed or removed); return how many closed."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self.transaction() as con:
            closed = [
                r[0]
                for r in con.execute(
                    "UPDATE quarantine SET resolved = true WHERE list_contains(?::BIGINT[], id) AND NOT resolved "
                    "RETURNING id",
                    [wanted],
                ).fetchall()
            ]
            if closed:
                detail = {"ids": sorted(closed), "reason": reason}
                event(con, "quarantine.resolved", run_id=run_id, actor=actor, detail=detail)
            return len(closed)

    def retry_quarantined(
        self, paths: Sequence[str] | None = None, actor: str | None = None
    ) -> list[QuarantineEntry]:
        """Let the next ingest read quarantined files again (all, or those at ``paths``).

        The open entries are resolved and the documents recorded as 'quarantined' for their bytes are
        forgotten: the delta then sees those bytes as new, parses them again, and quarantines them
        again if they still fail.  Documents in any other state are untouched.
        """
        with self.transaction() as con:
            entries = fetch(con, QuarantineEntry, "SELECT * FROM quarantine WHERE NOT resolved ORDER BY id")
            if paths is not None:
                wanted = set(paths)
                entries = [e for e in entries if e.path in wanted]
            if not entries:
                return []
            con.execute(
                "UPDATE quarantine SET resolved = true WHERE list_contains(?::BIGINT[], id)",
                [[e.id for e in entries]],
            )
            shas = sorted({e.sha256 for e in entries if e.sha256})
            if shas:
                con.execute(
                    "DELETE FROM documents WHERE status = 'quarantined' AND list_contains(?::VARCHAR[], doc_id)",
                    [shas],
                )
            detail = {"paths": sorted({e.path for e in entries})[:100], "count": len(entries)}
            event(con, "quarantine.retry", actor=actor, detail=detail)
            return entries

    def texts_used_elsewhere(self, texts: Iterable[str], doc_ids: Sequence[str]) -> dict[str, set[str]]:
        """Which of ``texts`` a chunk of a document outside ``doc_ids`` also has (any status), with
        the ids of those documents."""
        wanted = list(dict.fromkeys(texts))
        if not wanted:
            return {}
        with self.transaction() as con:
            rows = con.execute(
                "SELECT DISTINCT text, doc_id FROM chunks WHERE list_contains(?::VARCHAR[], text) "
                "AND NOT list_contains(?::VARCHAR[], doc_id)",
                [wanted, list(doc_ids)],
            ).fetchall()
        out: dict[str, set[str]] = {}
        for text, doc_id in rows:
            out.setdefault(text, set()).add(doc_id)
        return out

    def cache_models(self) -> list[tuple[str | None, str | None]]:
        """Distinct (model, prompt_version) of the LLM cache rows: what cache keys can be made of."""
        with self.transaction() as con:
            rows = con.execute("SELECT DISTINCT model, prompt_version FROM llm_cache ORDER BY ALL").fetchall()
        return [(r[0], r[1]) for r in rows]

    def purge_documents(
        self, doc_ids: Sequence[str], cache_keys: Sequence[str] = (), actor: str | None = None
    ) -> dict[str, int]:
        """Delete documents for good with their chunks, QA pairs, failures, quarantine entries and the
        given LLM cache rows, in one transaction (``retire_document`` is the reversible way).

        Adapter lineage (``version_pairs``) keeps the ids of purged pairs: versions are immutable
        records of what they were trained on.  Returns the rows deleted per table.
        """
        ids = list(dict.fromkeys(doc_ids))
        if not ids:
            raise RegistryError("purge needs at least one document id")

        def delete(con: Any, sql: str, params: list[Any]) -> int:
            return len(con.execute(sql, params).fetchall())

        with self.transaction() as con:
            docs = fetch(
                con, Document, "SELECT * FROM documents WHERE list_contains(?::VARCHAR[], doc_id)", [ids]
            )
            if missing := sorted(set(ids) - {d.doc_id for d in docs}):
                raise RegistryError(f"no document {', '.join(m[:12] for m in missing[:5])}")
            counts = {
                "qa_failures": delete(
                    con,
                    "DELETE FROM qa_failures WHERE chunk_id IN (SELECT chunk_id FROM chunks "
                    "WHERE list_contains(?::VARCHAR[], doc_id)) RETURNING chunk_id",
                    [ids],
                ),
                "qa_pairs": delete(
                    con,
                    "DELETE FROM qa_pairs WHERE list_contains(?::VARCHAR[], doc_id) RETURNING qa_id",
                    [ids],
                ),
                "chunks": delete(
                    con,
                    "DELETE FROM chunks WHERE list_contains(?::VARCHAR[], doc_id) RETURNING chunk_id",
                    [ids],
                ),
                "llm_cache": delete(
                    con,
                    "DELETE FROM llm_cache WHERE list_contains(?::VARCHAR[], key) RETURNING key",
                    [list(cache_keys)],
                ),
                "quarantine": delete(
                    con,
                    "DELETE FROM quarantine WHERE list_contains(?::VARCHAR[], sha256) RETURNING id",
                    [ids],
                ),
                "documents": delete(
                    con,
                    "DELETE FROM documents WHERE list_contains(?::VARCHAR[], doc_id) RETURNING doc_id",
                    [ids],
                ),
            }
            detail = {"doc_ids": ids, "paths": sorted({d.path for d in docs}), **counts}
            event(con, "document.purged", actor=actor, detail=detail)
            return counts

    # --- chunks -------------------------------------------------------------------------------
    def add_chunks(self, chunks: Iterable[Chunk], run_id: str | None = None) -> int:
        """Insert chunks, ignoring ids already present; return how many were new."""
        with self.transaction() as con:
            return _insert_chunks(con, chunks, run_id)

    def chunks(
        self, doc_id: str | None = None, status: str | None = "active", ids: Sequence[str] | None = None
    ) -> list[Chunk]:
        clauses, params = filters(doc_id=doc_id, status=status)
        if ids is not None:
            clauses.append("list_contains(?::VARCHAR[], chunk_id)")
            params.append(list(ids))
        return self.read(Chunk, f"SELECT * FROM chunks {where(clauses)} ORDER BY doc_id, idx", params)

    def first_chunks(self, doc_ids: Sequence[str], status: str | None = "active") -> list[Chunk]:
        """The first chunk (idx 0, where the title is) of each of these documents: what QA
        generation names a document's subject from (``tasks.chunking.document_subject``). With
        ``status=None`` also the first chunks of earlier versions of a document."""
        clauses, params = filters(status=status)
        clauses += ["idx = 0", "list_contains(?::VARCHAR[], doc_id)"]
        params.append(list(dict.fromkeys(doc_ids)))
        return self.read(Chunk, f"SELECT * FROM chunks {where(clauses)} ORDER BY doc_id", params)

    def chunks_without_qa(self, max_attempts: int | None = None, limit: int | None = None) -> list[Chunk]:
        """Active chunks still waiting for QA pairs: no live pair, not marked done and (optionally)
        not failed ``max_attempts`` times already."""
        sql = (
            "SELECT c.* FROM chunks c LEFT JOIN qa_failures f USING (chunk_id) "
            "WHERE c.status = 'active' AND NOT c.qa_done AND NOT EXISTS ("
            "  SELECT 1 FROM qa_pairs q WHERE q.chunk_id = c.chunk_id "
            "  AND q.status IN ('active', 'duplicate', 'excluded')) "
            "AND (? IS NULL OR coalesce(f.attempts, 0) < ?) ORDER BY c.doc_id, c.idx"
        )
        params: list[Any] = [max_attempts, max_attempts]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self.read(Chunk, sql, params)

    def chunks_on_old_fingerprint(
        self, fingerprint: str, doc_ids: Sequence[str] | None = None
    ) -> list[Chunk]:
        """Active chunks finished with QA under another generation than ``fingerprint`` (or before
        fingerprints were recorded), of these documents (``None``: all): ``moral qa regenerate``
        renews their pairs."""
        sql = (
            "SELECT * FROM chunks WHERE status = 'active' AND qa_done AND qa_fingerprint IS DISTINCT FROM ? "
            "AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], doc_id)) ORDER BY doc_id, idx"
        )
        ids = None if doc_ids is None else list(doc_ids)
        return self.read(Chunk, sql, [fingerprint, ids, ids])

    def count_chunks_on_old_fingerprint(self, fingerprint: str) -> int:
        with self.transaction() as con:
            row = con.execute(
                "SELECT count(*) FROM chunks WHERE status = 'active' AND qa_done "
                "AND qa_fingerprint IS DISTINCT FROM ?",
                [fingerprint],
            ).fetchone()
            return int(row[0]) if row else 0

    def record_regeneration(
        self,
        pairs: Iterable[QAPair],
        done: Iterable[str],
        fingerprint: str,
        run_id: str | None = None,
        actor: str | None = None,
    ) -> tuple[int, list[str], int]:
        """The outcome of ``moral qa regenerate`` in ONE transaction, for the chunks in ``done``
        (generated anew): the new pairs inserted; the chunks' other live pairs (active or
        duplicate) ``superseded``; a pair this generation made again that an earlier regeneration
        had superseded comes back as what it was; a duplicate (of any chunk) whose original was
        superseded active again, to be deduplicated anew; the chunks' fingerprint recorded.
        Excluded pairs stay excluded.  Returns (pairs new, ids superseded, pairs brought back)."""
        ids = list(dict.fromkeys(done))
        pairs = list(pairs)
        if not ids:
            return 0, [], 0
        keep = sorted({p.qa_id for p in pairs})
        with self.transaction() as con:
            added = _insert_pairs(con, pairs, run_id)
            back = len(
                con.execute(
                    "UPDATE qa_pairs SET status = CASE WHEN duplicate_of IS NULL THEN 'active' "
                    "ELSE 'duplicate' END WHERE list_contains(?::VARCHAR[], qa_id) "
                    "AND status = 'superseded' RETURNING qa_id",
                    [keep],
                ).fetchall()
            )
            gone = [
                r[0]
                for r in con.execute(
                    "UPDATE qa_pairs SET status = 'superseded' WHERE list_contains(?::VARCHAR[], chunk_id) "
                    "AND status IN ('active', 'duplicate') AND NOT list_contains(?::VARCHAR[], qa_id) "
                    "RETURNING qa_id",
                    [ids, keep],
                ).fetchall()
            ]
            # A duplicate whose original is gone becomes a pair of its own again (deduplicated anew
            # by the next index stage), or its fact could be left with nothing to train.
            freed = (
                len(
                    con.execute(
                        "UPDATE qa_pairs SET status = 'active', duplicate_of = NULL WHERE status = 'duplicate' "
                        "AND list_contains(?::VARCHAR[], duplicate_of) RETURNING qa_id",
                        [gone],
                    ).fetchall()
                )
                if gone
                else 0
            )
            con.execute(
                "UPDATE chunks SET qa_fingerprint = ?, qa_done = true WHERE list_contains(?::VARCHAR[], chunk_id)",
                [fingerprint, ids],
            )
            con.execute("DELETE FROM qa_failures WHERE list_contains(?::VARCHAR[], chunk_id)", [ids])
            detail = {
                "chunks": len(ids),
                "fingerprint": fingerprint,
                "pairs_new": added,
                "pairs_superseded": len(gone),
                "pairs_back": back,
                "duplicates_freed": freed,
            }
            event(con, "qa.regenerated", run_id=run_id, actor=actor, detail=detail)
            return added, sorted(gone), back

    def mark_chunks_qa_done(self, chunk_ids: Iterable[str], run_id: str | None = None) -> int:
        """Mark chunks as finished with QA generation (even with 0 valid pairs) and clear their failures."""
        ids = list(dict.fromkeys(chunk_ids))
        if not ids:
            return 0
        with self.transaction() as con:
            done = len(
                con.execute(
                    "UPDATE chunks SET qa_done = true WHERE list_contains(?::VARCHAR[], chunk_id) AND NOT qa_done "
                    "RETURNING chunk_id",
                    [ids],
                ).fetchall()
            )
            con.execute("DELETE FROM qa_failures WHERE list_contains(?::VARCHAR[], chunk_id)", [ids])
            if done:
                event(con, "chunks.qa_done", run_id=run_id, detail={"count": done})
            return done

    def record_qa_failure(self, chunk_id: str, error: str, run_id: str | None = None) -> int:
        """Count one more failed generation for a chunk; return its attempts so far."""
        now = utcnow()
        with self.transaction() as con:
            row = con.execute(
                _FAILURE_UPSERT + " RETURNING attempts", [chunk_id, error[:2000], run_id, now, now]
            ).fetchone()
            assert row is not None
            return int(row[0])

    def clear_qa_failures(self, chunk_ids: Iterable[str]) -> int:
        ids = list(chunk_ids)
        with self.transaction() as con:
            return len(
                con.execute(
                    "DELETE FROM qa_failures WHERE list_contains(?::VARCHAR[], chunk_id) RETURNING chunk_id",
                    [ids],
                ).fetchall()
            )

    def qa_failures(self, run_id: str | None = None) -> list[QAFailure]:
        clauses, params = filters(run_id=run_id)
        return self.read(QAFailure, f"SELECT * FROM qa_failures {where(clauses)} ORDER BY chunk_id", params)

    # --- QA pairs -----------------------------------------------------------------------------
    def add_qa_pairs(self, pairs: Iterable[QAPair], run_id: str | None = None) -> int:
        """Insert pairs, ignoring ids already present; return how many were new."""
        with self.transaction() as con:
            return _insert_pairs(con, pairs, run_id)

    def record_qa_results(
        self,
        pairs: Iterable[QAPair],
        done: Iterable[str],
        failures: Sequence[tuple[str, str]] = (),
        run_id: str | None = None,
        fingerprint: str | None = None,
    ) -> int:
        """The outcome of one QA stage in ONE transaction: new pairs, the chunks finished (their
        failures cleared, the generation's ``fingerprint`` recorded) and the chunks that failed
        (attempts counted, retried by the next run). Pairs and the 'done' flag land together, so a
        crash never marks a chunk done without its pairs. Returns how many pairs were new."""
        ids = list(dict.fromkeys(done))
        now = utcnow()
        with self.transaction() as con:
            added = _insert_pairs(con, pairs, run_id)
            if ids and fingerprint is not None:
                con.execute(
                    "UPDATE chunks SET qa_fingerprint = ? WHERE list_contains(?::VARCHAR[], chunk_id)",
                    [fingerprint, ids],
                )
            if ids:
                n = len(
                    con.execute(
                        "UPDATE chunks SET qa_done = true WHERE list_contains(?::VARCHAR[], chunk_id) "
                        "AND NOT qa_done RETURNING chunk_id",
                        [ids],
                    ).fetchall()
                )
                con.execute("DELETE FROM qa_failures WHERE list_contains(?::VARCHAR[], chunk_id)", [ids])
                if n:
                    event(con, "chunks.qa_done", run_id=run_id, detail={"count": n})
            for chunk_id, error in failures:
                con.execute(_FAILURE_UPSERT, [chunk_id, error[:2000], run_id, now, now])
            if failures:
                event(con, "qa.failed", run_id=run_id, detail={"count": len(failures)})
            return added

    def qa_pairs(
        self,
        split: str | None = None,
        status: str | None = "active",
        doc_id: str | None = None,
        run_id: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[QAPair]:
        """Pairs filtered by split/status/document/run (``None`` = any), in insertion order."""
        clauses, params = filters(split=split, status=status, doc_id=doc_id, run_id=run_id)
        if ids is not None:
            clauses.append("list_contains(?::VARCHAR[], qa_id)")
            params.append(list(ids))
        return self.read(
            QAPair, f"SELECT * FROM qa_pairs {where(clauses)} ORDER BY created_at, qa_id", params
        )

    def hold_out(self, qa_ids: Sequence[str], split: str, run_id: str | None = None) -> int:
        """Move these never-trained ``train`` pairs to ``split``: ``eval`` (paraphrase questions of
        trained facts) or ``dev`` (held-out wordings that choose the checkpoint), see
        ``tasks.splits``; a pair that some version was trained on is never moved."""
        if split not in {"eval", "dev"}:
            raise ValueError(f"held-out split must be 'eval' or 'dev', got {split!r}")
        if not qa_ids:
            return 0
        with self.transaction() as con:
            moved = [
                r[0]
                for r in con.execute(
                    "UPDATE qa_pairs SET split = ? WHERE list_contains(?::VARCHAR[], qa_id) AND split = 'train' "
                    "AND qa_id NOT IN (SELECT qa_id FROM version_pairs) RETURNING qa_id",
                    [split, list(qa_ids)],
                ).fetchall()
            ]
            if moved:
                kind = "paraphrase" if split == "eval" else "dev"
                event(con, "qa.held_out", run_id=run_id, detail={"count": len(moved), "kind": kind})
            return len(moved)

    def mark_duplicates(self, pairs: Iterable[tuple[str, str]], run_id: str | None = None) -> int:
        """Mark ``(qa_id, duplicate_of)`` pairs as duplicates; return how many changed."""
        items = [(q, d) for q, d in dict(pairs).items() if q != d]
        if not items:
            return 0
        with self.transaction() as con:
            changed = len(
                con.execute(
                    "UPDATE qa_pairs SET status = 'duplicate', duplicate_of = u.dup FROM "
                    "(SELECT unnest(?::VARCHAR[]) AS id, unnest(?::VARCHAR[]) AS dup) u "
                    "WHERE qa_pairs.qa_id = u.id AND qa_pairs.status IN ('active', 'duplicate') RETURNING qa_pairs.qa_id",
                    [[q for q, _ in items], [d for _, d in items]],
                ).fetchall()
            )
            if changed:
                event(con, "qa.duplicates", run_id=run_id, detail={"count": changed})
            return changed

    def exclude_pairs(
        self,
        qa_ids: Iterable[str],
        reason: str,
        actor: str | None = None,
        run_id: str | None = None,
        strict: bool = False,
    ) -> int:
        """Exclude pairs from training and evaluation (bad quality, operator decision); return how
        many changed.  ``strict`` refuses ids that do not exist."""
        ids = list(dict.fromkeys(qa_ids))
        with self.transaction() as con:
            if strict:
                known = {
                    r[0]
                    for r in con.execute(
                        "SELECT qa_id FROM qa_pairs WHERE list_contains(?::VARCHAR[], qa_id)", [ids]
                    ).fetchall()
                }
                if missing := [i for i in ids if i not in known]:
                    raise RegistryError(f"no QA pair {', '.join(missing[:5])}")
            changed = len(
                con.execute(
                    "UPDATE qa_pairs SET status = 'excluded' WHERE list_contains(?::VARCHAR[], qa_id) "
                    "AND status <> 'excluded' RETURNING qa_id",
                    [ids],
                ).fetchall()
            )
            if changed:
                detail = {"count": changed, "reason": reason, "ids": ids[:50]}
                event(con, "qa.excluded", run_id=run_id, actor=actor, detail=detail)
            return changed

    def resolve_qa_id(self, prefix: str) -> str:
        """The full id of the one pair whose id starts with ``prefix`` (lists show short ids)."""
        prefix = prefix.strip().lower()
        if len(prefix) < 6 or not all(c in "0123456789abcdef" for c in prefix):
            raise RegistryError(f"not a QA pair id: {prefix!r} (give at least 6 hex characters)")
        with self.transaction() as con:
            rows = con.execute(
                "SELECT qa_id FROM qa_pairs WHERE starts_with(qa_id, ?) ORDER BY qa_id LIMIT 3", [prefix]
            ).fetchall()
        if not rows:
            raise RegistryError(f"no QA pair {prefix}")
        if len(rows) > 1:
            raise RegistryError(f"QA pair id {prefix} is ambiguous: give more characters")
        return str(rows[0][0])

    def exclude_pair(self, qa_id: str, reason: str = "excluded", actor: str | None = None) -> None:
        """Exclude one pair; an unknown id is an error."""
        self.exclude_pairs([qa_id], reason, actor, strict=True)

    def existing_question_norms(self) -> dict[str, str]:
        """Normalised question -> qa_id of the earliest active pair asking it (for exact dedup)."""
        with self.transaction() as con:
            rows = con.execute(
                "SELECT question_norm, qa_id FROM qa_pairs WHERE status = 'active' ORDER BY created_at DESC, qa_id DESC"
            ).fetchall()
        return dict(rows)  # later rows (earlier pairs) win


# --- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentIn:
    """An active document to record (see :meth:`CorpusMixin.add_documents`)."""

    doc_id: str
    path: str
    source_root: str | None = None
    kind: str | None = None
    size: int | None = None


def _upsert_document(
    con: Any,
    doc_id: str,
    path: str,
    source_root: str | Path | None,
    kind: str | None,
    size: int | None,
    run_id: str | None,
) -> Literal["new", "renamed", "reactivated", "unchanged"]:
    """The body of :meth:`CorpusMixin.upsert_document`, inside the caller's transaction."""
    now = utcnow()
    root = None if source_root is None else str(source_root)
    found = fetch(con, Document, "SELECT * FROM documents WHERE doc_id = ?", [doc_id])
    if not found:
        con.execute(
            "INSERT INTO documents VALUES (?, ?, ?, ?, ?, 'active', NULL, ?, ?, ?, ?)",
            [doc_id, path, root, kind, size, run_id, run_id, now, now],
        )
        event(con, "document.added", run_id=run_id, detail={"doc_id": doc_id, "path": path})
        return "new"
    old = found[0]
    con.execute(
        "UPDATE documents SET path = ?, source_root = coalesce(?, source_root), kind = coalesce(?, kind), "
        "size = coalesce(?, size), status = 'active', reason = NULL, last_run = ?, updated_at = ? "
        "WHERE doc_id = ?",
        [path, root, kind, size, run_id, now, doc_id],
    )
    if old.status != "active":
        # Pairs come back as what they were before retirement: duplicates stay duplicates.
        con.execute("UPDATE chunks SET status = 'active' WHERE doc_id = ? AND status = 'retired'", [doc_id])
        con.execute(
            "UPDATE qa_pairs SET status = CASE WHEN duplicate_of IS NULL THEN 'active' ELSE 'duplicate' END "
            "WHERE doc_id = ? AND status = 'retired'",
            [doc_id],
        )
        con.execute("UPDATE quarantine SET resolved = true WHERE sha256 = ? AND NOT resolved", [doc_id])
        detail = {"doc_id": doc_id, "path": path, "was": old.status, "old_path": old.path}
        event(con, "document.reactivated", run_id=run_id, detail=detail)
        return "reactivated"
    if old.path != path:
        event(
            con,
            "document.renamed",
            run_id=run_id,
            detail={"doc_id": doc_id, "from": old.path, "to": path},
        )
        return "renamed"
    return "unchanged"


def _insert_chunks(con: Any, chunks: Iterable[Chunk], run_id: str | None) -> int:
    """Insert chunks (ignoring known ids) inside the caller's transaction; return how many were new."""
    now = utcnow()
    rows = [
        (
            c.chunk_id,
            c.doc_id,
            c.idx,
            c.page,
            c.text,
            c.n_tokens,
            c.status,
            c.qa_done,
            c.run_id or run_id,
            now,
        )
        for c in unique(chunks, lambda c: c.chunk_id)
    ]
    columns = [
        ("chunk_id", "VARCHAR"),
        ("doc_id", "VARCHAR"),
        ("idx", "INTEGER"),
        ("page", "INTEGER"),
        ("text", "VARCHAR"),
        ("n_tokens", "INTEGER"),
        ("status", "VARCHAR"),
        ("qa_done", "BOOLEAN"),
        ("run_id", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ]
    added = bulk_insert(con, "chunks", columns, rows)
    if added:
        event(con, "chunks.added", run_id=run_id, detail={"count": added})
    return added


#: One more failed generation for a chunk (first failure inserts, later ones count up).
_FAILURE_UPSERT = (
    "INSERT INTO qa_failures VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (chunk_id) DO UPDATE SET "
    "error = excluded.error, attempts = qa_failures.attempts + 1, run_id = excluded.run_id, "
    "updated_at = excluded.updated_at"
)


def _insert_pairs(con: Any, pairs: Iterable[QAPair], run_id: str | None) -> int:
    """Insert QA pairs (ignoring known ids) inside the caller's transaction; return how many were new."""
    now = utcnow()
    rows = [
        (
            p.qa_id,
            p.chunk_id,
            p.doc_id,
            p.question,
            p.answer,
            p.question_norm,
            p.split,
            p.status,
            p.duplicate_of,
            p.generator,
            p.prompt_version,
            p.run_id or run_id,
            now,
            p.fact_id,
        )
        for p in unique(pairs, lambda p: p.qa_id)
    ]
    columns = [
        ("qa_id", "VARCHAR"),
        ("chunk_id", "VARCHAR"),
        ("doc_id", "VARCHAR"),
        ("question", "VARCHAR"),
        ("answer", "VARCHAR"),
        ("question_norm", "VARCHAR"),
        ("split", "VARCHAR"),
        ("status", "VARCHAR"),
        ("duplicate_of", "VARCHAR"),
        ("generator", "VARCHAR"),
        ("prompt_version", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
        ("fact_id", "VARCHAR"),
    ]
    added = bulk_insert(con, "qa_pairs", columns, rows)
    if added:
        event(con, "qa.added", run_id=run_id, detail={"count": added})
    return added
