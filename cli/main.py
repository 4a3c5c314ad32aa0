"""The ``moral`` command line: refresh, versions, ask, and the command groups of ``cli/{data,eval,ops,bank}.py``.

Heavy imports (Prefect, torch, Chroma) happen inside the subcommands, so ``moral --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import bank as cli_bank
from cli import data as cli_data
from cli import eval as cli_eval
from cli import ops as cli_ops
from cli.util import print_json as _print_json
from storage.settings import apply_runtime_env


def cmd_refresh(args: argparse.Namespace) -> int:
    from flows.params import RefreshParams
    from flows.refresh import run_refresh

    params = RefreshParams(source=args.source, until=args.until or "all")
    summary = run_refresh(params, quiet=args.json)
    if args.json:
        _print_json(summary)
    else:
        from tasks.report import summary_text

        print(summary_text(summary))
    return 0 if summary.get("status") == "completed" else 1


def cmd_versions(args: argparse.Namespace) -> int:
    from storage.registry import Registry, format_version
    from storage.settings import get_settings

    settings = get_settings()
    registry = Registry(settings.registry_path)
    versions = registry.list_versions() if settings.registry_path.exists() else []
    rows = [
        {
            "version": v.name,
            "status": v.status,
            "is_champion": v.is_champion,
            "created_at": v.created_at.isoformat(),
            "kind": v.kind,
            "parent_version": format_version(v.parent_version) if v.parent_version else None,
            "base_model": v.base_model,
            "metrics": v.metrics or {},
            "decision_reasons": v.decision_reasons or [],
        }
        for v in versions
    ]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no adapter versions yet: run `moral refresh`")
        return 0
    for r in rows:
        star = "*" if r["is_champion"] else " "
        print(f"{star} {r['version']:>4}  {r['status']:<9}  {str(r['created_at'])[:19]}  {r['kind'] or ''}")
        for reason in r["decision_reasons"]:
            print(f"        {reason}")
        if (
            r["status"] == "candidate"
            and r["decision_reasons"][:1] != []
            and str(r["decision_reasons"][0]).startswith("awaiting approval")
        ):
            print("        WARNING: no new version trains until this one is decided")
    print("(* = champion)")
    return 0


def ask_fixed(path: str, as_json: bool) -> int:
    """Hand-written questions (JSONL: question, answer, aliases) asked closed-book of the base model
    and of the champion, side by side, each scored by strict recall; with the nearest trained
    question, to show they were not trained."""
    import contextlib
    import json

    from moe.infer import generate_answers
    from server.model import load_answering_model
    from storage.registry import Registry
    from storage.settings import get_settings
    from tasks.metrics import strict_recall
    from tasks.splits import jaccard

    settings = get_settings()
    with open(path, encoding="utf-8") as fh:
        items = [json.loads(line) for line in fh if line.strip()]
    questions = [it["question"] for it in items]
    reg = Registry.from_settings(settings) if settings.registry_path.exists() else None
    version, label = None, "the champion"
    if reg is not None and reg.champion() is None:  # nothing promoted: show what training produced
        trained_versions = [v for v in reg.list_versions() if v.artifact_uri]
        if trained_versions:
            version = trained_versions[-1].version
            label = f"v{version} ({trained_versions[-1].status}, not promoted)"
    model, tokenizer, name = load_answering_model(settings, version)
    champion = generate_answers(model, tokenizer, questions, max_new_tokens=32, first_line=True)
    if name is not None:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            base = generate_answers(model, tokenizer, questions, max_new_tokens=32, first_line=True)
    else:
        base = champion
    trained_ids = set(reg.trained_pairs()) if reg is not None else set()
    trained = [p.question for p in reg.qa_pairs(status=None) if p.qa_id in trained_ids] if reg else []
    rows = []
    for it, b, c in zip(items, base, champion, strict=True):
        gold, aliases = it["answer"], it.get("aliases", [])
        near = max(trained, key=lambda t: jaccard(it["question"], t)) if trained else None
        rows.append({
            "question": it["question"], "gold": gold,
            "base": b, "base_correct": bool(strict_recall(b, gold, aliases)),
            "champion": c, "champion_correct": bool(strict_recall(c, gold, aliases)),
            "nearest_trained": near, "nearest_jaccard": round(jaccard(it["question"], near), 2) if near else None,
        })  # fmt: skip
    if as_json:
        _print_json({"model": name, "model_is": label if name else "base model", "questions": rows})
        return 0
    mark = {True: "right", False: "wrong"}
    print(f"Closed-book, base model vs {label if name else 'base model (nothing trained yet)'} [{name}]:")
    for r in rows:
        print(f"\nQ: {r['question']}   (gold: {r['gold']})")
        print(f"  base:     {r['base']!r:60} {mark[r['base_correct']]}")
        print(f"  adapter:  {r['champion']!r:60} {mark[r['champion_correct']]}")
        if r["nearest_trained"]:
            print(f"  nearest trained question (word overlap {r['nearest_jaccard']}): {r['nearest_trained']}")
    print(
        f"\nright: base {sum(r['base_correct'] for r in rows)}/{len(rows)}, "
        f"{name or 'base'} {sum(r['champion_correct'] for r in rows)}/{len(rows)}"
    )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from server.model import answer_question

    if args.questions:
        return ask_fixed(args.questions, args.json)
    if not args.question:
        raise SystemExit("moral ask: give a question, or --questions FILE")

    result = answer_question(args.question, version=args.version, open_book=args.open_book)
    if args.json:
        _print_json(result)
    else:
        print(result["answer"])
        who = result["version"] or "base model (no champion yet)"
        print(f"-- answered by {who}" + (f"; context from {len(result['sources'])} passages" if args.open_book else ""),
              file=sys.stderr)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moral", description="MoRAL Refresh: keep a language model's knowledge current."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "refresh", help="run one knowledge refresh (ingest -> QA -> index -> train -> evaluate -> promote)"
    )
    p.add_argument("--source", help="folder of documents (default: MORAL_REFRESH_SOURCE, examples/docs)")
    p.add_argument(
        "--until", choices=["ingest", "qa", "index", "train", "evaluate"], help="stop after this stage"
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("versions", help="list adapter versions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("ask", help="answer a question with the champion adapter (base model when none)")
    p.add_argument("question", nargs="?")
    p.add_argument(
        "--questions",
        metavar="FILE",
        help="JSONL of hand-written questions (question, answer, aliases): ask each closed-book of the "
        "base model and the champion, side by side, scored by strict recall",
    )
    p.add_argument(
        "--open-book", action="store_true", help="retrieve passages from the index into the prompt"
    )
    p.add_argument("--version", help="answer with this version (3 or v3) instead of the champion")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ask)

    # Further command groups live beside this file, one module each; each adds its subcommands.
    for group in (cli_data, cli_eval, cli_ops, cli_bank):
        group.register(sub)
    return parser


def _silence_teardown_noise() -> None:
    """After a Prefect flow run, DuckDB's nanobind bindings print ~100 lines of "leaked instance"
    warnings while the interpreter tears modules down (harmless: the process is exiting).  An atexit
    handler registered first runs last, after Prefect's own handlers (which stop its temporary server
    and log that), so pointing stderr at /dev/null there hides only the teardown noise."""
    import atexit
    import os

    if os.environ.get("MORAL_DEBUG"):
        return

    def mute() -> None:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)

    atexit.register(mute)


def main(argv: Sequence[str] | None = None) -> int:
    apply_runtime_env()
    _silence_teardown_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for expected failures; tracebacks with MORAL_DEBUG=1
        import os

        if os.environ.get("MORAL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
