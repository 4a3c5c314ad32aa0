"""Batched evaluation on the tiny local Llama: every suite kind, QR and FL, base vs adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluate import EvalItem, Suite, evaluate_adapters, evaluate_model, evaluation_rows


def _suites() -> list[Suite]:
    qa = [EvalItem("Who made the Kestrel?", "Ada Lin"), EvalItem("Where is Orla?", "Tromsø")]
    ctx = [EvalItem(q.question, q.answer, ("Orla is in Tromsø.", "Ada Lin made the Kestrel.")) for q in qa]
    return [
        Suite("new_knowledge", qa, extras=("qr", "fl")),
        Suite("new_knowledge", ctx, "open", extras=("qr", "fl")),
        Suite("world_knowledge", qa, nll=True),
        Suite(
            "faith",
            [EvalItem(q.question, "Bo", ctx[0].context, original=q.answer) for q in qa],
            "open",
            kind="faith",
        ),
        Suite("refusal", ctx, "open", kind="refusal", system="Say I don't know if unsure."),
    ]


def _embed(texts):
    # A deterministic stand-in with the Embedder's contract (unit rows): a letter histogram.
    out = np.zeros((len(texts), 26), dtype=np.float32)
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1)


def test_evaluate_model_scores_every_suite_kind(tiny_model_dir):
    from moe.base_model import load_base_model

    model, tok = load_base_model(tiny_model_dir)
    scores, preds = evaluate_model(model, tok, _suites(), max_new_tokens=6, embed=_embed)
    assert set(scores) == {
        "new_knowledge",
        "new_knowledge:open",
        "world_knowledge",
        "faith:open",
        "refusal:open",
    }
    nk = scores["new_knowledge"]
    assert {"ra", "ra_em", "ra_f1", "ra_contains", "qr"} <= set(nk)
    assert len(nk["ra"]) == 2 and all(v in (0.0, 1.0) for v in nk["ra"])
    assert all(-1.0 <= v <= 1.0 for v in nk["qr"])
    # FL covers the non-empty answers: a perplexity >= 1 each.
    said = [a for a in preds["new_knowledge"] if a.strip()]
    assert len(nk.get("fl", [])) == len(said) and all(v >= 1.0 for v in nk.get("fl", []))
    assert len(scores["world_knowledge"]["nll"]) == 2 and all(v > 0 for v in scores["world_knowledge"]["nll"])
    assert set(scores["faith:open"]) == {"faith"} and set(scores["refusal:open"]) == {"rr"}
    # Deterministic: greedy decoding and teacher forcing give the same numbers twice.
    again, _ = evaluate_model(model, tok, _suites(), max_new_tokens=6, embed=_embed)
    assert again == scores


def test_evaluate_adapters_base_matches_the_plain_base_model(tiny_model_dir, tmp_path):
    import torch

    from moe.base_model import load_base_model
    from moe.config import MoRALConfig
    from moe.model import MoRALModel

    base, tok = load_base_model(tiny_model_dir)
    model = MoRALModel(base, MoRALConfig(num_experts=2, top_k=1, rank=2, alpha=4))
    with torch.no_grad():  # non-zero experts, so the adapter changes the outputs
        for name, p in model.adapter_state_dict().items():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "moral")

    suites = _suites()[:3]
    out = evaluate_adapters(tiny_model_dir, suites, {"candidate": tmp_path / "moral"}, max_new_tokens=6)
    plain, _ = evaluate_model(*load_base_model(tiny_model_dir), suites, max_new_tokens=6)
    assert out.scores["world_knowledge"]["base"]["nll"] == pytest.approx(plain["world_knowledge"]["nll"])
    assert out.scores["world_knowledge"]["candidate"]["nll"] != pytest.approx(plain["world_knowledge"]["nll"])

    rows = evaluation_rows(out, suites, seed=0)
    row = next(
        r
        for r in rows
        if (r["model"], r["suite"], r["mode"], r["metric"]) == ("base", "new_knowledge", "open", "ra")
    )
    assert row["n"] == 2 and row["ci_low"] <= row["value"] <= row["ci_high"]
    assert not any(math.isnan(r["value"]) for r in rows)
    assert evaluation_rows(out, suites, seed=0) == rows


def test_base_memo_gives_the_same_scores_and_computes_each_base_output_once(tiny_model_dir, tmp_path):
    from moe.base_model import load_base_model
    from moe.config import MoRALConfig
    from moe.model import MoRALModel
    from tasks.evaluate import BaseMemo

    base, tok = load_base_model(tiny_model_dir)
    MoRALModel(base, MoRALConfig(num_experts=2, top_k=1, rank=2, alpha=4)).save_pretrained(tmp_path / "moral")
    suites = [
        *_suites()[:3],
        Suite("drift", [EvalItem("Say hello.", ""), EvalItem("Count to three.", "")], kind="drift"),
    ]
    plain = evaluate_adapters(tiny_model_dir, suites, {"candidate": tmp_path / "moral"}, max_new_tokens=6)
    memo = BaseMemo(tmp_path / "memo.json", "sha-of-the-tiny-base")
    first = evaluate_adapters(
        tiny_model_dir, suites, {"candidate": tmp_path / "moral"}, max_new_tokens=6, memo=memo
    )
    assert first.scores == plain.scores and first.predictions == plain.predictions
    assert memo.misses > 0 and (tmp_path / "memo.json").exists()
    # A later evaluation (a new process: the memo is read from its file) computes no base output again.
    again = BaseMemo(tmp_path / "memo.json", "sha-of-the-tiny-base")
    second = evaluate_adapters(
        tiny_model_dir, suites, {"candidate": tmp_path / "moral"}, max_new_tokens=6, memo=again
    )
    assert second.scores == plain.scores and again.misses == 0 and again.hits >= memo.misses
    # Another base model (another checksum) shares nothing.
    other = BaseMemo(tmp_path / "memo.json", "another-base")
    evaluate_adapters(tiny_model_dir, suites, {}, max_new_tokens=6, memo=other)
    assert other.misses == memo.misses  # everything is computed again
