"""Lifelong ablation: 4 arms x 3 successive refreshes (examples/docs' four core documents, docs2,
docs3), one factor at a time.

Arms: ``full`` (bank initialisation + replay + LoRAMoE localized constraint), ``no_bank``,
``no_replay``, ``no_localized``.  Each arm runs in its own data home under ``--work``; the refresh
stages are the project's own (ingest, QA, index, train), with every version promoted so the three
refreshes chain the same way in every arm (the gate is not what is being measured here).  After the
third refresh the arm's three versions are scored, closed-book, with the same code the evaluation
stage uses:

* ``new_ra``: each version's RA (``ra_contains``) on its own delta's held-out eval pairs, averaged
  over the three refreshes;
* ``retention_ra``: the third version's RA on the first document set's eval pairs;
* ``world_nll``: the third version's mean gold-answer NLL on the FanOutQA holdout (lower = less
  forgetting), with the base model's value alongside.

QA pairs come from the bundled local generator once (first arm) and are copied into the other
arms' LLM caches, so every arm trains on the same pairs.  Prints one JSON table on stdout.

    .venv/bin/python bench/ablation.py --work /tmp/moral-ablation          # full (about an hour, 2 cores)
    .venv/bin/python bench/ablation.py --work /tmp/moral-ablation --quick  # smoke run, small sizes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.settings import Settings, apply_runtime_env  # noqa: E402

#: The three sets' names; the first is the demo folder's four core documents (``tests.corpus``), as
#: when the figures in BENCHMARKS.md were taken (the demo folder now holds 13): see :func:`sets`.
SETS = ("docs", "docs2", "docs3")


def sets(work: Path) -> list[Path]:
    """The source folders of the three refreshes: the four core documents copied under ``work``,
    then ``examples/docs2`` and ``examples/docs3``."""
    from tests.corpus import copy_core

    return [copy_core(work / "docs"), ROOT / "examples" / "docs2", ROOT / "examples" / "docs3"]


ARMS = {
    "full": {"bank_init": True, "loramoe": True},
    "no_bank": {"bank_init": False, "loramoe": True},
    "no_replay": {"bank_init": True, "loramoe": True, "replay_budget": 0},
    "no_localized": {"bank_init": True, "loramoe": False},
}


#: Size overrides from the command line (--epochs, --holdout-size, --bank-k), applied to every arm.
SIZES: dict = {}


def arm_settings(home: Path, quick: bool, overrides: dict) -> Settings:
    sizes = (
        {
            "epochs": 2,
            "holdout_size": 10,
            "qa_pairs_per_chunk": 2,
            "bank_k": 4,
            "num_experts": 4,
            "bank_experts": 2,
        }
        if quick
        else {"epochs": 5, "holdout_size": 40, "bank_k": 8}
    )
    return Settings(home=home, **{**sizes, **SIZES}, **overrides)


def copy_llm_cache(src: Path, dst_settings: Settings) -> int:
    """The first arm's QA generations, replayed into another arm's registry (same chunks, same pairs)."""
    from storage.records import CacheEntry
    from storage.registry import Registry

    if not src.exists():
        return 0
    with Registry(src).transaction() as con:
        rows = con.execute("SELECT key, response, model, prompt_version, tokens FROM llm_cache").fetchall()
    entries = [CacheEntry(k, json.loads(r), m, p, t) for k, r, m, p, t in rows]
    return Registry.from_settings(dst_settings).cache_put_many(entries)


def score_version(settings: Settings, version, questions: list[str], answers: list[str]) -> float | None:
    """Closed-book RA (gold contained in the greedy answer) of one version; None without questions."""
    if not questions:
        return None
    from moe.base_model import base_model_identity, load_base_model
    from moe.infer import generate_answers
    from moe.model import MoRALModel
    from tasks.metrics import score_answers

    base_path, _ = base_model_identity(settings.base_model, settings.model_cache)
    base, tok = load_base_model(base_path)
    model = MoRALModel.from_pretrained(base, Path(version.artifact_uri))
    preds = generate_answers(model, tok, questions, max_new_tokens=settings.eval_max_new_tokens)
    scores = score_answers(preds, answers)["ra_contains"]
    return sum(scores) / len(scores)


def world_nll(settings: Settings, artifact: str | None) -> float | None:
    from moe.base_model import base_model_identity, load_base_model
    from moe.infer import answer_nll
    from moe.model import MoRALModel
    from tasks.holdout import holdout_sample

    pairs = holdout_sample(settings.holdout_size, settings.seed)
    if not pairs:
        return None
    base_path, _ = base_model_identity(settings.base_model, settings.model_cache)
    model, tok = load_base_model(base_path)
    if artifact is not None:
        model = MoRALModel.from_pretrained(model, Path(artifact))
    nll = answer_nll(model, tok, [p.question for p in pairs], [p.answer for p in pairs])
    return sum(nll) / len(nll)


def run_arm(name: str, work: Path, quick: bool, cache_from: Path | None) -> dict:
    from storage.registry import Registry
    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage
    from tasks.stages.qa import qa_stage
    from tasks.stages.train import train_stage

    home = work / name
    shutil.rmtree(home, ignore_errors=True)
    settings = arm_settings(home, quick, ARMS[name])
    settings.ensure_dirs()
    reg = Registry.from_settings(settings)
    started = time.perf_counter()
    versions, delta_docs = [], []
    for source in sets(work):
        run_id = reg.start_run({"bench": "ablation", "arm": name, "source": str(source)})
        if cache_from is not None:
            copy_llm_cache(cache_from, settings)
        ing = ingest_stage(settings, source, run_id)
        qa_stage(settings, run_id)
        index_stage(settings, run_id)
        tr = train_stage(settings, run_id)
        if tr.version is None:
            raise RuntimeError(f"{name}: nothing trained for {source}: {tr.reason}")
        reg.decide_version(tr.version, "promoted", ["ablation: chained without the gate"], actor="bench")
        reg.finish_run(run_id, "completed", {"version": tr.version})
        versions.append(tr.version)
        docs = {d.doc_id for d in reg.documents() if any(d.path == p for p in ing.documents_new)}
        delta_docs.append(docs)
        print(
            f"[{name}] {source.name}: v{tr.version}, bank={tr.bank.get('chosen')}, replay={tr.replay}",
            file=sys.stderr,
        )

    eval_pairs = reg.qa_pairs(split="eval")
    by_set = [[p for p in eval_pairs if p.doc_id in docs] for docs in delta_docs]
    new_ra = [
        score_version(settings, reg.get_version(v), [p.question for p in ps], [p.answer for p in ps])
        for v, ps in zip(versions, by_set, strict=True)
    ]
    last = reg.get_version(versions[-1])
    retention = score_version(settings, last, [p.question for p in by_set[0]], [p.answer for p in by_set[0]])
    measured = [x for x in new_ra if x is not None]
    return {
        "arm": name,
        "new_ra": round(sum(measured) / len(measured), 4) if measured else None,
        "new_ra_per_refresh": [None if x is None else round(x, 4) for x in new_ra],
        "retention_ra": None if retention is None else round(retention, 4),
        "world_nll": round(world_nll(settings, last.artifact_uri) or float("nan"), 4),
        "eval_sizes": [len(ps) for ps in by_set],
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/moral-ablation"), help="arms' data homes")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run, not a measurement)")
    parser.add_argument("--arms", nargs="*", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--epochs", type=int, help="training epochs per refresh (default 5; 2 with --quick)")
    parser.add_argument("--holdout-size", type=int, help="FanOutQA questions for world NLL (default 40)")
    parser.add_argument("--bank-k", type=int, help="dev examples scoring each bank entry (default 8)")
    args = parser.parse_args(argv)
    for name in ("epochs", "holdout_size", "bank_k"):
        if getattr(args, name) is not None:
            SIZES[name] = getattr(args, name)
    apply_runtime_env()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, first = [], None
    for arm in args.arms:
        rows.append(run_arm(arm, args.work, args.quick, first))
        print(f"[{arm}] result: {json.dumps(rows[-1])}", file=sys.stderr)  # kept if a later arm fails
        first = first or (args.work / arm / "registry.duckdb")
    settings = arm_settings(args.work / args.arms[0], args.quick, {})
    table = {
        "command": " ".join(["bench/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
        "sets": list(SETS),
        "base_world_nll": round(world_nll(settings, None) or float("nan"), 4),
        "arms": rows,
    }
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
