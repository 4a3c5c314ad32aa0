"""Where an adapter acts: its effect on the model's output and (MoRAL) its expert load, by prompt kind.

MoRAL's claim is that the mixture leaves out-of-domain and context-reading prompts to the frozen
model. This measures it on a trained data home (e.g. an arm of ``bench/knowledge.py --work DIR``):
for three kinds of prompt —

* ``closed``: hand-written questions about the documents (``bench/knowledge/questions.jsonl``);
* ``open_book``: the same questions with the passages retrieval gives them;
* ``general``: the drift check's general prompts (never trained) —

it runs each prompt with the adapter on and off and reports the relative change of the last hidden
state (mean over prompt tokens of ||h_adapter - h_base|| / ||h_base||) and the KL divergence of the
next-token distribution at the end of the prompt; for a MoRAL version also the expert load (entropy
of the mean top-k load per router, in nats: log(E) is uniform). Prints ONE JSON object.

    .venv/bin/python bench/prompt_kinds.py --home /tmp/kb/work/moral-seed0 [--version 4] [--n 40]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts_by_kind(settings, n: int) -> dict[str, tuple[list[str], list[str | None]]]:
    from server.model import retrieve_passages
    from storage.vectors import VectorStore
    from tasks.holdout import drift_prompts

    rows = [
        json.loads(x)
        for x in (ROOT / "bench" / "knowledge" / "questions.jsonl").read_text().splitlines()
        if x
    ]
    questions = [r["question"] for r in rows if r.get("group") == "trained"][:n]
    store = VectorStore(settings)
    contexts = [retrieve_passages(store, q, k=settings.serve_retrieval_k)[0] for q in questions]
    return {
        "closed": (questions, [None] * len(questions)),
        "open_book": (questions, contexts),
        "general": (drift_prompts(n), [None] * n),
    }


def effect(model, tokenizer, questions, contexts) -> dict:
    import torch

    from moe.infer import build_prompt

    has_toggle = hasattr(model, "disable_adapter")
    rel, kl = [], []
    with torch.inference_mode():
        for q, c in zip(questions, contexts, strict=True):
            ids = tokenizer(build_prompt(tokenizer, q, c), return_tensors="pt", add_special_tokens=False)[
                "input_ids"
            ]
            on = model(input_ids=ids, output_hidden_states=True)
            with model.disable_adapter() if has_toggle else torch.no_grad():
                off = model(input_ids=ids, output_hidden_states=True)
            h_on, h_off = on.hidden_states[-1][0], off.hidden_states[-1][0]
            rel.append(float(((h_on - h_off).norm(dim=-1) / h_off.norm(dim=-1).clamp_min(1e-6)).mean()))
            p_log, q_log = on.logits[0, -1].log_softmax(-1), off.logits[0, -1].log_softmax(-1)
            kl.append(float((p_log.exp() * (p_log - q_log)).sum()))
    return {
        "n": len(rel),
        "hidden_change": round(statistics.mean(rel), 4),
        "next_token_kl": round(statistics.mean(kl), 4),
    }


def load_entropy(model, tokenizer, questions, contexts) -> float | None:
    import torch

    from moe.infer import build_prompt

    if not hasattr(model, "expert_stats"):
        return None
    model.reset_stats()
    with torch.inference_mode():
        for q, c in zip(questions, contexts, strict=True):
            ids = tokenizer(build_prompt(tokenizer, q, c), return_tensors="pt", add_special_tokens=False)[
                "input_ids"
            ]
            model(input_ids=ids)
    entropies = []
    for stats in model.expert_stats().values():
        load = stats.get("load") or []
        total = sum(load)
        if total > 0:
            entropies.append(-sum(x / total * math.log(x / total) for x in load if x > 0))
    return round(statistics.mean(entropies), 4) if entropies else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--version", type=int, help="default: the newest trained version")
    parser.add_argument("--n", type=int, default=40, help="prompts per kind")
    args = parser.parse_args(argv)
    os.environ["MORAL_HOME"] = str(args.home)
    from server.model import load_answering_model
    from storage.registry import Registry
    from storage.settings import get_settings

    settings = get_settings()
    reg = Registry.from_settings(settings)
    version = args.version or [v for v in reg.list_versions() if v.artifact_uri][-1].version
    model, tokenizer, name = load_answering_model(settings, version)
    out = {"home": str(args.home), "version": name, "kind": reg.get_version(version).kind, "by_kind": {}}
    for kind, (questions, contexts) in prompts_by_kind(settings, args.n).items():
        row = effect(model, tokenizer, questions, contexts)
        row["expert_load_entropy"] = load_entropy(model, tokenizer, questions, contexts)
        out["by_kind"][kind] = row
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
