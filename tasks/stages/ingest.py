"""The ingest stage: scan the source, parse and chunk new or changed documents, quarantine what
cannot be read, retire what disappeared.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from storage.corpus import DocumentIn
from storage.records import Chunk
from storage.registry import Registry
from storage.settings import Settings
from tasks.stages.progress import Progress, log, say


@dataclass
class IngestSummary:
    documents_new: list[str] = field(default_factory=list)
    documents_unchanged: int = 0
    documents_renamed: list[str] = field(default_factory=list)
    documents_retired: list[str] = field(default_factory=list)
    documents_quarantined: list[dict] = field(default_factory=list)
    chunks_added: int = 0


def ingest_stage(
    settings: Settings, source: Path, run_id: str, progress: Progress | None = None
) -> IngestSummary:
    """Scan ``source``, work out the delta against the registry, parse and chunk what is new."""
    from tasks.chunking import chunk_pages
    from tasks.ingest import ParseError, parse_document, plan_delta, scan_source

    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {source} does not exist")
    reg = Registry.from_settings(settings)
    out = IngestSummary()
    scan = scan_source(source, settings.max_file_mb)
    docs = reg.documents()
    known = {d.doc_id: d.path for d in docs}
    # Only documents under this source root can be found changed or deleted by its scan: documents
    # ingested from another folder (another team's, an earlier batch's) stay as they are.
    active_paths = {
        d.path: d.doc_id for d in docs if d.status == "active" and Path(d.path).is_relative_to(source)
    }
    status_of = {d.doc_id: d for d in docs}
    delta = plan_delta(scan.files, known, active_paths)

    if settings.qa_backend == "openai" and delta.to_process:
        _warm_openai_client()  # ~1 s of imports the QA stage needs, overlapped with parsing
    _resolve_stale_quarantine(reg, source, scan, run_id)
    for q in scan.rejected:
        reg.quarantine(q.path, q.sha256, q.reason, run_id)
        out.documents_quarantined.append({"path": str(q.path), "reason": q.reason})
    for f in delta.unchanged:
        doc = status_of.get(f.sha256)
        if doc is not None and doc.status == "quarantined":
            # Same bytes fail the same way: not parsed again, but still reported until fixed.
            out.documents_quarantined.append({"path": str(f.path), "reason": doc.reason or "quarantined"})
        else:
            out.documents_unchanged += 1
    for r in delta.renamed:
        doc = status_of.get(r.file.sha256)
        if doc is not None and doc.status == "quarantined":
            # Known bad bytes under a new name are still bad: quarantined at the new path, not revived.
            reason = doc.reason or "quarantined"
            reg.quarantine(r.file.path, r.file.sha256, reason, run_id)
            out.documents_quarantined.append({"path": str(r.file.path), "reason": reason})
            continue
        reg.upsert_document(
            r.file.sha256,
            str(r.file.path),
            source_root=str(source),
            kind=r.file.kind,
            size=r.file.size,
            run_id=run_id,
        )
        out.documents_renamed.append(str(r.file.path))
    for c in delta.changed:
        reg.retire_document(c.old_sha256, run_id, reason=f"{c.file.path} changed: replaced by new content")
        out.documents_retired.append(str(c.file.path))
    for d in delta.deleted:
        reg.retire_document(d.sha256, run_id, reason=f"{d.path} deleted from the source")
        out.documents_retired.append(d.path)

    chunks: list[Chunk] = []
    accepted: list[DocumentIn] = []
    for f in delta.to_process:
        try:
            parsed = parse_document(f, settings.max_pdf_pages)
        except ParseError as exc:
            reason = exc.reason
        except Exception as exc:  # a parser bug on one odd file must not stop the run
            log.exception("parsing %s failed", f.path)
            reason = f"parse failed: {type(exc).__name__}: {exc}"
        else:
            accepted.append(DocumentIn(f.sha256, str(f.path), str(source), f.kind, f.size))
            out.documents_new.append(str(f.path))
            for c in chunk_pages(f.sha256, parsed.pages, settings.chunk_tokens, settings.chunk_overlap):
                chunks.append(replace(c, run_id=run_id))
            continue
        reg.quarantine(f.path, f.sha256, reason, run_id)
        out.documents_quarantined.append({"path": str(f.path), "reason": reason})
    if accepted:  # documents and their chunks in one transaction: never a document without chunks
        _, out.chunks_added = reg.add_documents(accepted, chunks, run_id=run_id)
    say(
        progress,
        f"ingest: {len(out.documents_new)} new, {out.documents_unchanged} unchanged, "
        f"{len(out.documents_retired)} retired, {len(out.documents_quarantined)} quarantined, "
        f"{out.chunks_added} chunks",
    )
    return out


def _resolve_stale_quarantine(reg: Registry, source: Path, scan, run_id: str) -> None:
    """Close the open quarantine entries under ``source`` whose file is gone or has other bytes now
    (fixed, or bad in a new way: that gets its own entry), so ``moral quarantine list`` shows what is
    still wrong. Entries for the same bytes at the same path stay open."""
    current = {str(f.path): f.sha256 for f in scan.files}
    rejected = {str(q.path) for q in scan.rejected}
    prefix = str(source).rstrip("/") + "/"
    stale = [
        e.id
        for e in reg.quarantined()
        if e.path.startswith(prefix)
        and e.path not in rejected
        and (e.path not in current or e.sha256 != current[e.path])
    ]
    if stale:
        reg.resolve_quarantine(stale, "file fixed or removed from the source", run_id=run_id)


def _warm_openai_client() -> None:
    """Load the openai client's modules in a daemon thread, so that the QA stage finds them loaded."""
    import threading

    from tasks.qa_openai import warm_up

    threading.Thread(target=warm_up, name="warm-openai", daemon=True).start()
