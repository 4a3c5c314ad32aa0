"""The adapter bank: ``moral bank add | list | why``.

Promoted MoRAL versions are bank entries by themselves (one per expert); ``add`` registers an
external peft LoRA adapter after checking it fits the current base model.
"""

from __future__ import annotations

import argparse
import json

from cli.util import print_json


def cmd_bank_add(args: argparse.Namespace) -> int:
    from storage.registry import Registry
    from storage.settings import get_settings
    from tasks.bank import add_external

    settings = get_settings()  # the bank may come first: the registry is created if there is none
    entry = add_external(Registry.from_settings(settings), settings, args.path, name=args.name)
    if args.json:
        print_json(entry.to_dict())
    else:
        print(f"added '{entry.name}': rank {entry.rank} on {', '.join(entry.targets)} ({entry.path})")
    return 0


def cmd_bank_list(args: argparse.Namespace) -> int:
    from storage.registry import Registry
    from storage.settings import get_settings

    settings = get_settings()
    entries = Registry.from_settings(settings).bank_entries() if settings.registry_path.exists() else []
    if args.json:
        print_json([e.to_dict() for e in entries])
        return 0
    if not entries:
        print("the bank is empty: promoted versions and `moral bank add PATH` fill it")
        return 0
    for e in entries:
        print(f"{e.name:<24} {e.source:<9} rank {e.rank or '?':<3} {','.join(e.targets) or '-':<40} {e.path}")
    return 0


def cmd_bank_why(args: argparse.Namespace) -> int:
    from storage.home import selection_path
    from storage.records import parse_version
    from storage.settings import get_settings

    path = selection_path(get_settings(), parse_version(args.version))
    if not path.is_file():
        raise FileNotFoundError(f"no bank selection recorded for {args.version} ({path})")
    body = json.loads(path.read_text())
    if args.json:
        print_json(body)
    else:
        print(body.get("explanation", ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``moral`` parser."""
    bank = sub.add_parser("bank", help="the adapter bank new versions' experts may start from")
    bank_sub = bank.add_subparsers(dest="bank_command", required=True)

    p = bank_sub.add_parser("add", help="register a peft LoRA adapter directory (same base model)")
    p.add_argument("path", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--name", help="name in the bank (default: the folder's name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bank_add)

    p = bank_sub.add_parser("list", help="list bank entries (experts of promoted versions, registered LoRAs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bank_list)

    p = bank_sub.add_parser("why", help="explain which bank entries a version's experts started from")
    p.add_argument("version", help="version (3 or v3)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bank_why)
