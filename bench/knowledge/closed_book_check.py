"""Ask the base model every benchmark question closed-book and count lenient hits (any gold alias, normalised
as in check_corpus.py, appears as whole words in the answer). The corpus is invented, so the hit rate should
stay at or below 0.05; a higher rate means a question or value leaks.

Run (slow on CPU, ~1 min per 100 questions): `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n 10
.venv/bin/python bench/knowledge/closed_book_check.py [--out answers.jsonl]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from check_corpus import contains, read_jsonl  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="write every question and answer here (jsonl)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    from moe.base_model import load_base_model, resolve_base_model
    from moe.infer import generate_answers
    from storage.settings import Settings

    torch.set_num_threads(args.threads)
    settings = Settings()
    path = resolve_base_model(settings.base_model, settings.model_cache)
    model, tokenizer = load_base_model(path, device="cpu")

    questions = read_jsonl(HERE / "questions.jsonl")
    edits = read_jsonl(HERE / "edit_questions.jsonl")
    rows = [dict(q, aliases=q["answers"]) for q in questions] + [
        dict(q, group="edit", aliases=q["answers"] + q["old_answers"]) for q in edits
    ]
    answers = generate_answers(
        model, tokenizer, [r["question"] for r in rows], max_new_tokens=args.max_new_tokens, batch_size=16
    )
    result: dict = {"model": str(path)}
    for r, a in zip(rows, answers, strict=True):
        r["model_answer"] = a
        r["hit"] = any(contains(a, alias) for alias in r["aliases"])
    for group in ("trained", "document_only", "edit"):
        sel = [r for r in rows if r["group"] == group]
        hits = [r["qid"] for r in sel if r["hit"]]
        result[group] = {
            "n": len(sel),
            "hits": len(hits),
            "rate": round(len(hits) / max(len(sel), 1), 4),
            "hit_qids": hits,
        }
    answerable = [r for r in rows if r["group"] in ("trained", "document_only")]
    n_hits = sum(r["hit"] for r in answerable)
    result["answerable"] = {"n": len(answerable), "hits": n_hits, "rate": round(n_hits / len(answerable), 4)}
    print(json.dumps(result, indent=2))
    for r in rows:
        if r["hit"]:
            print(f"HIT {r['qid']}: {r['question']} -> {r['model_answer']!r} (aliases {r['aliases']})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
