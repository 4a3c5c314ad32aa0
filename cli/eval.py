"""Evaluation commands: ``moral eval``, ``moral report``, ``moral compare``."""

from __future__ import annotations

import argparse
import math

from cli.util import open_registry, print_json


def _clean(x: float | None) -> float | None:
    # JSON has no NaN: an empty sample's mean and interval are printed as null.
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def eval_rows(settings, version: str | None = None) -> list[dict]:
    """The latest stored evaluation of each version (or of one) as flat JSON-ready rows."""
    from storage.registry import Registry, format_version

    if not settings.registry_path.exists():
        return []
    reg = Registry.from_settings(settings)
    return [
        {
            "version": format_version(e.version) if e.version is not None else None,
            "model": e.model,
            "suite": e.suite,
            "mode": e.mode,
            "metric": e.metric,
            "value": _clean(e.value),
            "n": e.n,
            "ci_low": _clean(e.ci_low),
            "ci_high": _clean(e.ci_high),
        }
        for e in reg.latest_evaluations(version)
    ]


def saved_evaluation_of(settings, version: str | None) -> tuple[int, dict]:
    """A version's number (the latest when None) and its saved ``evaluations/vN.json``; a clear
    error when there is no registry, no version or no saved evaluation."""
    from storage.registry import Registry
    from tasks.report import saved_evaluation
    from tasks.stages.evaluate import version_number

    if not settings.registry_path.exists():
        raise ValueError("no registry yet: run `moral refresh` first")
    number = version_number(Registry.from_settings(settings), version)
    saved = saved_evaluation(settings, number)
    if saved is None:
        raise ValueError(
            f"v{number} has no saved evaluation (it never reached the evaluate stage): "
            f"run `moral eval --rerun --version v{number}`"
        )
    return number, saved


def print_by_document(settings, version: str | None, as_json: bool) -> int:
    """``moral eval --by-document``: facts per document the reference model and the candidate answer."""
    import sys

    from tasks.report import (
        KNOWLEDGE_NOT_RECORDED,
        knowledge_by_document,
        knowledge_recorded,
        knowledge_section,
    )

    number, saved = saved_evaluation_of(settings, version)
    if as_json:
        if not knowledge_recorded(saved):
            print(f"v{number}: {KNOWLEDGE_NOT_RECORDED}", file=sys.stderr)
        print_json(knowledge_by_document(saved))
        return 0
    print(f"# v{number}\n")
    print(knowledge_section(saved), end="")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from storage.settings import get_settings
    from tasks.stages.evaluate import rerun_evaluation

    settings = get_settings()
    version = args.version
    if args.rerun:
        version = str(rerun_evaluation(settings, version))
    if args.by_document:
        return print_by_document(settings, version, args.json)
    rows = eval_rows(settings, version)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no evaluations yet: run `moral refresh`")
        return 0
    for r in rows:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r["ci_low"] is not None else "[n/a]"
        value = f"{r['value']:.3f}" if r["value"] is not None else "n/a"
        print(
            f"{r['version']:>4} {r['model']:<9} {r['suite']:<16} {r['mode']:<6} {r['metric']:<11} "
            f"{value} {ci} n={r['n']}"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from storage.settings import get_settings
    from tasks.plots import write_html_report

    settings = get_settings()
    print(write_html_report(open_registry(settings), settings, args.version))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import sys

    from storage.settings import get_settings
    from tasks.compare import compare_lora, compare_markdown

    settings = get_settings()
    result = compare_lora(
        open_registry(settings),
        settings,
        args.version,
        progress=None if args.json else lambda m: print(m, file=sys.stderr),
    )
    if args.json:
        print_json(result)
    else:
        print(compare_markdown(result))
        print(f"(saved to {result['path']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``moral`` parser."""
    p = sub.add_parser("eval", help="stored evaluation results (base / champion / candidate, n and 95%% CI)")
    p.add_argument("--version", help="only this version (3 or v3); with --rerun the one to re-evaluate")
    p.add_argument(
        "--rerun", action="store_true", help="re-evaluate (the latest version by default) before printing"
    )
    p.add_argument(
        "--by-document",
        action="store_true",
        help="per document: the facts the reference model (champion, else base) and the candidate answer, "
        "what was learned and forgotten (the latest version by default)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of result rows")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="write a self-contained HTML report of a version and print its path")
    p.add_argument("version", nargs="?", help="version (3 or v3); default: the latest")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare", help="train plain LoRA on the latest MoRAL version's pairs; MoRAL vs LoRA vs base"
    )
    p.add_argument("--version", help="the MoRAL version to compare (default: the latest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)
