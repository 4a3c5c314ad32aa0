"""MoRAL vs plain LoRA on the same delta: the paper's retention claim checked on our own data.

A plain peft LoRA (same targets, rank, alpha, epochs and learning rate as the settings) is trained on
exactly the pairs a MoRAL version was trained on (its delta and its replay), then the base model, the
MoRAL version and the LoRA are evaluated on that version's suites in one pass each.  The LoRA is
never registered (it is not a candidate for champion): its adapter lies in the content-addressed
adapter store, so a second comparison reuses it, and the table is written to
``$MORAL_HOME/compare/vN.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from storage.files import write_json_atomic
from storage.home import compare_path
from storage.registry import Registry
from storage.settings import Settings

ARMS = ("base", "moral", "lora")


def _latest_moral(reg: Registry, version: int | str | None):
    if version is not None:
        v = reg.get_version(version)
        if v.kind not in (None, "moral"):
            raise ValueError(f"{v.name} is a {v.kind} adapter; compare needs a MoRAL version")
        return v
    versions = [v for v in reg.list_versions() if v.kind in (None, "moral") and v.artifact_uri]
    if not versions:
        raise ValueError("no MoRAL version to compare with yet: run `moral refresh` first")
    return versions[-1]


def pivot(rows: list[dict]) -> list[dict]:
    """Evaluation rows (one per arm) into one row per (suite, mode, metric) with a column per arm."""
    table: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["suite"], r["mode"], r["metric"])
        row = table.setdefault(
            key, {"suite": r["suite"], "mode": r["mode"], "metric": r["metric"], "n": r["n"]}
        )
        row[r["model"]] = None if r["value"] is None or math.isnan(r["value"]) else r["value"]
        row[f"{r['model']}_ci"] = [r["ci_low"], r["ci_high"]]
    return list(table.values())


def compare_lora(
    reg: Registry,
    settings: Settings,
    version: int | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train plain LoRA on a MoRAL version's pairs and evaluate base / MoRAL / LoRA on its suites."""
    from moe.base_model import base_model_identity
    from storage.vectors import Embedder
    from tasks.evaluate import evaluate_adapters, evaluation_rows
    from tasks.stages.evaluate import base_memo, build_suites
    from tasks.train import TrainPair, train_candidate

    say = progress or (lambda _m: None)
    v = _latest_moral(reg, version)
    roles = reg.trained_pairs(v.version)
    pairs = [p for p in reg.qa_pairs() if p.qa_id in roles]
    if not pairs:
        raise ValueError(f"{v.name}'s training pairs are no longer active: nothing to train LoRA on")
    train = [TrainPair(p.qa_id, p.question, p.answer, 0 if roles[p.qa_id] == "delta" else 1) for p in pairs]
    base_path, identity = base_model_identity(settings.base_model, settings.model_cache)
    if why := v.other_base(identity["sha256"]):
        raise ValueError(why)
    from tasks.stages.train import gather_examples

    delta = [p for p in pairs if roles[p.qa_id] == "delta"]
    examples = gather_examples(settings, reg, train, delta, base_path, identity["sha256"], progress)
    say(f"compare: training plain LoRA on {v.name}'s {len(train)} pairs and the same example mix")
    lora = train_candidate(settings, base_path, identity["sha256"], train, kind="lora", examples=examples)
    suites = build_suites(settings, reg, v.version)
    say(
        "compare: evaluating base, MoRAL and LoRA on "
        + ", ".join(f"{s.key} n={len(s.items)}" for s in suites)
    )
    output = evaluate_adapters(
        base_path,
        suites,
        {"moral": Path(v.artifact_uri), "lora": lora.artifact_dir},
        max_new_tokens=settings.eval_max_new_tokens,
        embed=Embedder.from_settings(settings).encode,
        progress=say,
        memo=base_memo(settings, identity["sha256"]),
    )
    result = {
        "version": v.name,
        "lora_artifact": str(lora.artifact_dir),
        "lora_train_seconds": lora.metrics.get("seconds"),
        "moral_params": v.params,
        "lora_params": lora.params,
        "train_pairs": len(train),
        "rows": pivot(evaluation_rows(output, suites, seed=settings.seed)),
    }
    path = write_json_atomic(compare_path(settings, v.version), result, indent=2)
    result["path"] = str(path)
    return result


def compare_markdown(result: dict) -> str:
    """The comparison as one markdown table (value per arm, n)."""

    def cell(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"MoRAL {result['version']} vs plain LoRA on the same {result['train_pairs']} pairs",
        "",
        "| suite | mode | metric | n | base | MoRAL | LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['suite']} | {r['mode']} | {r['metric']} | {r['n']} | "
            + " | ".join(cell(r.get(arm)) for arm in ARMS)
            + " |"
        )
    return "\n".join(lines)
