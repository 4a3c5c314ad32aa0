"""Operations: ``moral promote``, ``moral rollback``, ``moral deploy``, ``moral serve``, ``moral preflight``,
``moral gc``, ``moral backup``, ``moral restore``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from cli.util import cli_actor, print_json


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.rollback import emit_adapter_event
    from storage.settings import get_settings
    from tasks.stages.promote import promote_version

    settings = get_settings()
    result = promote_version(settings, args.version, reason=args.reason, force=args.force, actor=cli_actor())
    result["event_emitted"] = emit_adapter_event("promoted", result["version"], settings, result)
    if args.json:
        print_json(result)
    else:
        forced = " (forced)" if result["forced"] else ""
        print(
            f"{result['version']} is now the champion{forced} (was {result['previous_champion'] or 'none'})"
        )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows.rollback import emit_adapter_event
    from storage.settings import get_settings
    from tasks.stages.promote import rollback_adapter

    settings = get_settings()
    result = rollback_adapter(settings, to=args.to, reason=args.reason, actor=cli_actor())
    result["event_emitted"] = emit_adapter_event("rolled-back", result["to"], settings, result)
    if args.json:
        print_json(result)
    else:
        print(f"rolled back: {result['to']} is the champion again; {result['from']} is revoked")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from storage.backup import gc
    from storage.settings import get_settings

    settings = get_settings()
    if args.older_than_days is not None:
        settings = settings.model_copy(update={"gc_rejected_after_days": args.older_than_days})
    report = gc(settings, dry_run=args.dry_run, actor=cli_actor())
    if args.json:
        print_json(asdict(report))
        return 0
    verb = "would delete" if report.dry_run else "deleted"
    for item in report.deleted:
        print(f"{verb} {item['version']}: {item['path']} ({item['bytes']} bytes)")
    print(
        f"{verb} files of {len(report.deleted)} rejected version(s) older than {report.older_than_days:g} days, "
        f"{report.bytes_freed} bytes"
    )
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from storage.backup import backup
    from storage.settings import get_settings

    report = backup(get_settings(), args.dir)
    if args.json:
        print_json(asdict(report))
    else:
        print(
            f"backup in {report.path}: registry ({report.versions} versions, schema {report.schema_versions[-1]}), "
            f"{len(report.adapters)} adapter dirs, index {report.chroma or 'none'}, "
            f"folders {', '.join(report.folders) or 'none'}, {report.bytes} bytes"
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from storage.backup import restore
    from storage.registry import Registry
    from storage.settings import get_settings

    home = Path(args.home).expanduser().resolve() if args.home else get_settings().home
    registry = restore(args.dir, home)
    reg = Registry(registry)
    result = {"home": str(home), "versions": len(reg.list_versions()), "champion": reg.champion()}
    if args.json:
        print_json(result)
    else:
        champion = f"v{result['champion']}" if result["champion"] else "none"
        print(f"restored {args.dir} into {home}: {result['versions']} versions, champion {champion}")
        if args.home:
            print(f"use it with MORAL_HOME={home}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import serve_deployments

    serve_deployments(limit=args.limit)
    return 0


def placeholders(environ: Mapping[str, str]) -> list[str]:
    """Names of the variables still holding .env.example's ``CHANGE-ME`` placeholder."""
    from storage.settings import PLACEHOLDER

    return sorted(k for k, v in environ.items() if PLACEHOLDER in v)


def cmd_preflight(args: argparse.Namespace) -> int:
    """The compose stack's first service: refuse to start anything while a secret is a placeholder."""
    import os

    left = placeholders(os.environ)
    if left:
        print(
            "error: replace the CHANGE-ME placeholders in .env before starting the stack: " + ", ".join(left),
            file=sys.stderr,
        )
        return 1
    print("preflight: no placeholder secrets")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import run_server
    from storage.settings import get_settings

    run_server(get_settings(), host=args.host, port=args.port)
    return 0


def cmd_chroma(args: argparse.Namespace) -> int:
    from storage.chroma_server import status, stop_chroma_server
    from storage.settings import get_settings

    settings = get_settings()
    if args.action == "stop":
        stopped = stop_chroma_server(settings)
        result = {"stopped": stopped, **status(settings)}
        if args.json:
            print_json(result)
        else:
            print("stopped the data home's Chroma server" if stopped else "no Chroma server was running")
        return 0
    result = status(settings)
    if args.json:
        print_json(result)
    elif result["mode"] == "external":
        print(f"MORAL_CHROMA_URL {result['url']}: {'answering' if result['answering'] else 'NOT answering'}")
    elif result["running"]:
        print(f"running: pid {result['pid']} on {result['url']} over {result['path']}")
    else:
        print(f"not running ({result['path']}); `moral serve` and `moral deploy` start it on demand")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``moral`` parser."""
    p = sub.add_parser(
        "chroma", help="the data home's shared Chroma server (started by serve/deploy): status or stop"
    )
    p.add_argument("action", choices=("status", "stop"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_chroma)

    p = sub.add_parser("promote", help="make a version the champion (audited; --force for rejected/revoked)")
    p.add_argument("version", help="version to promote (3 or v3)")
    p.add_argument("--reason", required=True, help="why (required: written to the audit log)")
    p.add_argument(
        "--force", action="store_true", help="promote a rejected or revoked version anyway (an override)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="move the champion back; the version rolled back from is revoked")
    p.add_argument("--to", help="version to roll back to (default: the previous promoted champion)")
    p.add_argument("--reason", default="rollback from the CLI", help="why (written to the audit log)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser(
        "gc", help="delete the files of old rejected versions (never promoted or revoked ones)"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.add_argument(
        "--older-than-days", type=float, help="age threshold (default: MORAL_GC_REJECTED_AFTER_DAYS)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "backup", help="consistent copy of the data home into DIR: registry, adapters, Chroma index, folders"
    )
    p.add_argument("dir", help="a new (or empty) directory outside the data home")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "restore",
        help="lay a `moral backup` out as a data home (new or empty): registry, adapters, index, folders",
    )
    p.add_argument("dir", help="the backup directory")
    p.add_argument("--home", help="where to restore (default: MORAL_HOME); it must be new or empty")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser(
        "deploy",
        help="serve the knowledge-refresh (nightly + manual) and rollback-adapter deployments from this process",
    )
    p.add_argument("--limit", type=int, default=1, help="flow runs at once in this process (default 1)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser(
        "preflight",
        help="check the environment before a deployment starts (compose runs it first): "
        "refuses CHANGE-ME placeholder secrets",
    )
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible endpoint answering with the champion (follows promotions and rollbacks)",
    )
    p.add_argument("--host", help="address to bind (default: MORAL_SERVE_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: MORAL_SERVE_PORT, 8000)")
    p.set_defaults(func=cmd_serve)
