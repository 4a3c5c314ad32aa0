"""Looking at the data before training: ``moral qa``, ``moral quarantine``, ``moral docs``.

``qa list`` / ``qa exclude`` let a user inspect the generated pairs and drop bad ones before paying
for training (an excluded pair is never trained on, replayed or evaluated); ``qa regenerate`` renews
the pairs of chunks generated with another model, prompt or settings. ``quarantine list`` shows
the files that could not be ingested and why; ``quarantine retry`` makes the *next* ``moral refresh``
read them again (a retry needs the source folder and the parsing settings of a run, and doing it in
the run keeps one writer of the corpus). ``docs purge`` deletes a document's data for good.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli.util import open_registry, print_json

if TYPE_CHECKING:
    from storage.registry import Registry
    from storage.settings import Settings

SHORT_ID = 12  # characters of a qa_id shown in text output; `qa exclude` accepts any unique prefix


def _registry(settings: Settings, must_exist: bool) -> Registry | None:
    return open_registry(settings, must_exist)


# --- moral qa ----------------------------------------------------------------------------------
def cmd_qa_list(args: argparse.Namespace) -> int:
    from storage.settings import get_settings
    from tasks.documents import match_documents

    reg = _registry(get_settings(), must_exist=False)
    rows: list[dict] = []
    if reg is not None:
        paths = {d.doc_id: d.path for d in reg.documents()}
        doc_ids: set[str] | None = None
        if args.doc:
            matched = match_documents(reg, args.doc)
            if not matched:
                raise ValueError(f"no document recorded at {args.doc}")
            doc_ids = {d.doc_id for d in matched}
        status = None if args.status in (None, "all") else args.status
        for p in reg.qa_pairs(split=args.split, status=status):
            if doc_ids is not None and p.doc_id not in doc_ids:
                continue
            if args.status is not None or p.status not in (
                "retired",
                "superseded",
            ):  # what can still be trained
                rows.append(
                    {
                        "qa_id": p.qa_id,
                        "question": p.question,
                        "answer": p.answer,
                        "split": p.split,
                        "status": p.status,
                        "duplicate_of": p.duplicate_of,
                        "doc_id": p.doc_id,
                        "path": paths.get(p.doc_id),
                        "chunk_id": p.chunk_id,
                        "generator": p.generator,
                        "prompt_version": p.prompt_version,
                        "run_id": p.run_id,
                    }
                )
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no QA pairs" + (" match" if reg is not None else " yet: run `moral refresh`"))
        return 0
    for r in rows:
        print(
            f"{r['qa_id'][:SHORT_ID]}  {r['split']:<5}  {r['status']:<9}  {r['question']}  ->  {r['answer']}"
        )
    print(f"({len(rows)} pairs; `moral qa exclude ID` keeps one out of training)")
    return 0


def cmd_qa_exclude(args: argparse.Namespace) -> int:
    from storage.settings import get_settings
    from tasks.documents import exclude_pairs

    settings = get_settings()
    reg = _registry(settings, must_exist=True)
    assert reg is not None
    ids = [reg.resolve_qa_id(i) for i in args.ids]  # all resolved first: a typo excludes nothing
    changed = exclude_pairs(reg, settings, ids, args.reason, actor="cli")
    if args.json:
        print_json({"excluded": changed, "qa_ids": ids})
    else:
        print(
            f"excluded {changed} pair(s)"
            + (f" ({len(ids) - changed} already excluded)" if changed < len(ids) else "")
        )
    return 0


def cmd_qa_regenerate(args: argparse.Namespace) -> int:
    """Renew the pairs of chunks generated another way than the current settings say (under the
    refresh lock, so never beside a refresh)."""
    from dataclasses import asdict

    from storage.lock import refresh_lock
    from storage.settings import get_settings
    from tasks.documents import match_documents
    from tasks.stages.qa import regenerate_stage

    settings = get_settings()
    reg = _registry(settings, must_exist=True)
    assert reg is not None
    doc_ids = None
    if args.doc:
        matched = match_documents(reg, args.doc)
        if not matched:
            raise ValueError(f"no document recorded at {args.doc}")
        doc_ids = sorted({d.doc_id for d in matched})
    progress = None if args.json else (lambda line: print(line, file=sys.stderr))
    with refresh_lock(settings.home, purpose="qa regenerate"):
        total = asdict(regenerate_stage(settings, progress=progress, doc_ids=doc_ids, dry_run=args.dry_run))
    if args.json:
        print_json(total)
        return 0
    if args.dry_run:
        print(f"{total['chunks_on_old_fingerprint']} chunks would be regenerated with {total['fingerprint']}")
    elif total["chunks_on_old_fingerprint"] == 0:
        print(f"every chunk's pairs are from {total['fingerprint']}: nothing to regenerate")
    else:
        print(
            f"regenerated {total['chunks_regenerated']} of {total['chunks_on_old_fingerprint']} chunks: "
            f"{total['pairs_new']} new pairs, {total['pairs_superseded']} superseded, {total['pairs_back']} back; "
            f"{total['llm_calls']} LLM calls, {total['cache_hits']} cache hits"
        )
        left = len(total["qa_failed"]) + total["skipped_by_cap"]
        if left:
            print(
                f"{left} chunks keep their old pairs (failed or over a spend cap): run it again",
                file=sys.stderr,
            )
        print("the next `moral refresh` indexes and trains the new pairs")
    return 0


# --- moral quarantine --------------------------------------------------------------------------
def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from storage.settings import get_settings

    reg = _registry(get_settings(), must_exist=False)
    entries = [] if reg is None else reg.quarantined(open_only=not args.all)
    rows = [
        {
            "id": e.id,
            "path": e.path,
            "sha256": e.sha256,
            "reason": e.reason,
            "run_id": e.run_id,
            "created_at": e.created_at,
            "resolved": e.resolved,
        }
        for e in entries
    ]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("nothing quarantined")
        return 0
    for r in rows:
        print(f"{r['path']}: {r['reason']}" + ("  (resolved)" if r["resolved"] else ""))
    print(f"({len(rows)} files; `moral quarantine retry` reads them again on the next refresh)")
    return 0


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    from storage.settings import get_settings

    reg = _registry(get_settings(), must_exist=True)
    assert reg is not None
    paths = None
    if args.paths:
        open_paths = {e.path for e in reg.quarantined()}
        paths = []
        for p in args.paths:
            found = {
                p,
                str(Path(p).expanduser().absolute()),
                str(Path(p).expanduser().resolve()),
            } & open_paths
            if not found:
                raise ValueError(f"{p} is not quarantined (see `moral quarantine list`)")
            paths.extend(sorted(found))
    released = reg.retry_quarantined(paths, actor="cli")
    if args.json:
        print_json({"retried": [e.path for e in released]})
    elif released:
        for e in released:
            print(f"will retry {e.path}")
        print(f"({len(released)} files are read again by the next `moral refresh`)")
    else:
        print("nothing quarantined")
    return 0


# --- moral docs --------------------------------------------------------------------------------


def cmd_docs_purge(args: argparse.Namespace) -> int:
    from storage.settings import get_settings
    from tasks.documents import purge_document

    settings = get_settings()
    result = purge_document(_registry(settings, must_exist=True), settings, args.path)
    if args.json:
        print_json(result)
        return 0
    print(
        f"purged {', '.join(result['paths'])}: {result['chunks']} chunks, {result['qa_pairs']} QA pairs, "
        f"{result['vectors']} vectors, {result['llm_cache']} cached LLM replies"
    )
    for p in result["still_in_source"]:
        print(f"warning: {p} still exists; the next `moral refresh` ingests it again unless you remove it",
              file=sys.stderr)  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``moral`` parser."""
    qa = sub.add_parser("qa", help="inspect generated question/answer pairs; exclude bad ones")
    qa_sub = qa.add_subparsers(dest="qa_command", required=True)
    p = qa_sub.add_parser(
        "list", help="list QA pairs (not retired or superseded ones unless --status says so)"
    )
    p.add_argument("--doc", metavar="PATH", help="only the pairs of this document")
    p.add_argument("--split", choices=["train", "dev", "eval"], help="only this split")
    p.add_argument(
        "--status",
        choices=["active", "duplicate", "excluded", "retired", "superseded", "all"],
        help="only this status (default: every status but retired and superseded)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list with full ids")
    p.set_defaults(func=cmd_qa_list)
    p = qa_sub.add_parser("exclude", help="never train on these pairs (ids or unique id prefixes)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--reason", default="excluded by operator", help="recorded in the audit log")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_qa_exclude)
    p = qa_sub.add_parser(
        "regenerate",
        help="renew the pairs of chunks generated with another model, prompt or MORAL_QA_* setting "
        "(their old pairs superseded; cached replies reused)",
    )
    p.add_argument("--doc", metavar="PATH", help="only the chunks of this document")
    p.add_argument("--dry-run", action="store_true", help="only count the chunks it would regenerate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_qa_regenerate)

    q = sub.add_parser("quarantine", help="files that could not be ingested")
    q_sub = q.add_subparsers(dest="quarantine_command", required=True)
    p = q_sub.add_parser("list", help="quarantined files with their reasons")
    p.add_argument("--all", action="store_true", help="include resolved entries")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quarantine_list)
    p = q_sub.add_parser("retry", help="read quarantined files again on the next `moral refresh`")
    p.add_argument("paths", nargs="*", metavar="PATH", help="only these files (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quarantine_retry)

    d = sub.add_parser("docs", help="documents in the registry")
    d_sub = d.add_subparsers(dest="docs_command", required=True)
    p = d_sub.add_parser(
        "purge", help="delete a document's chunks, pairs, vectors and cached LLM replies for good"
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_docs_purge)
