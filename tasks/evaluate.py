"""Evaluate stage: base, champion and candidate on the same suites, each in batched passes.

Suites (closed-book unless noted):

* ``new_knowledge`` — the delta's held-out ``eval`` pairs (never trained on); also open-book, with
  the top chunks retrieved from Chroma in the prompt, when contexts are supplied;
* ``retention`` — held-out pairs of earlier deltas (domain retention);
* ``world_knowledge`` — the FanOutQA holdout, for forgetting: RA and gold-answer NLL.

Per-item values are returned so the gate can bootstrap paired differences.  Metric ``ra`` is
"gold contained in the answer" on SQuAD-normalised text; ``ra_em`` and ``ra_f1`` are kept too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.metrics import bootstrap_ci, mean, score_answers


@dataclass(frozen=True)
class EvalItem:
    question: str
    answer: str
    context: str | None = None


@dataclass
class Suite:
    name: str
    items: list[EvalItem]
    mode: str = "closed"  # "closed" | "open"
    nll: bool = False  # also compute teacher-forced gold-answer NLL

    @property
    def key(self) -> str:
        return self.name if self.mode == "closed" else f"{self.name}:{self.mode}"


@dataclass
class EvalOutput:
    scores: dict[str, dict[str, dict[str, list[float]]]]  # suite key -> model -> metric -> values
    predictions: dict[str, dict[str, list[str]]] = field(
        default_factory=dict
    )  # suite key -> model -> answers


def evaluate_model(
    model,
    tokenizer,
    suites: Sequence[Suite],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[str]]]:
    """Scores of one model on every suite: one batched generation (and NLL) pass per suite."""
    from moe.infer import answer_nll, generate_answers

    scores: dict[str, dict[str, list[float]]] = {}
    preds: dict[str, list[str]] = {}
    for suite in suites:
        if not suite.items:
            continue
        questions = [it.question for it in suite.items]
        golds = [it.answer for it in suite.items]
        contexts = [it.context for it in suite.items] if suite.mode == "open" else None
        answers = generate_answers(
            model,
            tokenizer,
            questions,
            contexts=contexts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        per_item = score_answers(answers, golds)
        per_item["ra"] = per_item["ra_contains"]
        if suite.nll:
            per_item["nll"] = answer_nll(
                model, tokenizer, questions, golds, contexts=contexts, batch_size=batch_size
            )
        scores[suite.key] = per_item
        preds[suite.key] = answers
    return scores, preds


def evaluate_versions(
    base_path: Path,
    suites: Sequence[Suite],
    *,
    candidate_dir: Path | None,
    champion_dir: Path | None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> EvalOutput:
    """Base (adapter disabled), champion and candidate on the same suites."""
    from moe.base_model import load_base_model

    say = progress or (lambda _msg: None)
    out = EvalOutput(scores={}, predictions={})

    def record(model_name: str, model, tokenizer) -> None:
        say(f"evaluating {model_name}")
        sc, pr = evaluate_model(
            model, tokenizer, suites, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        for key, metrics in sc.items():
            out.scores.setdefault(key, {})[model_name] = metrics
            out.predictions.setdefault(key, {})[model_name] = pr[key]

    base, tokenizer = load_base_model(base_path)
    if candidate_dir is not None:
        candidate = load_adapter(base, candidate_dir)
        with candidate.disable_adapter():
            record("base", candidate, tokenizer)
        record("candidate", candidate, tokenizer)
        del candidate, base
    else:
        record("base", base, tokenizer)
        del base
    if champion_dir is not None:
        base2, tokenizer = load_base_model(base_path)
        record("champion", load_adapter(base2, champion_dir), tokenizer)
    return out


def load_adapter(base, adapter_dir: Path):
    """A version's model: a MoRAL adapter, or (for comparisons) a plain peft LoRA, on ``base``."""
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("adapter_type") == "moral":
        from moe.model import MoRALModel

        return MoRALModel.from_pretrained(base, adapter_dir)
    from moe.lora import load_lora

    return load_lora(base, adapter_dir)


def evaluation_rows(output: EvalOutput, suites: Sequence[Suite], seed: int = 0) -> list[dict]:
    """Flatten scores into registry rows: one per (model, suite, mode, metric) with n and a 95% CI."""
    modes = {s.key: (s.name, s.mode) for s in suites}
    rows = []
    for key, by_model in output.scores.items():
        suite, mode = modes.get(key, (key, "closed"))
        for model_name, metrics in by_model.items():
            for metric, values in metrics.items():
                low, high = bootstrap_ci(values, seed=seed)
                rows.append(
                    {
                        "model": model_name,
                        "suite": suite,
                        "mode": mode,
                        "metric": metric,
                        "value": mean(values),
                        "n": len(values),
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
    return rows
