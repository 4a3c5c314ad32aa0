"""Evaluate stage: base, champion and candidate on the same suites, each in batched passes.

Suites (closed-book unless noted; see ``tasks.stages.evaluate.build_suites`` and ``tasks.splits``):

* ``paraphrase`` — facts trained as QA, asked in a wording far from every trained one (the gate's);
* ``unseen`` — facts of the delta's documents that no trained pair asks about;
  both also open-book, with the top chunks retrieved from Chroma in the prompt;
* ``retention`` — held-out pairs of earlier deltas (domain retention);
* ``world_knowledge`` — the FanOutQA holdout, for forgetting: RA and gold-answer NLL in a
  format-neutral prompt (``Question: …\nAnswer:``), so a terser answer format is not "knowledge";
* ``drift`` — the base model's own greedy answers to general prompts, scored by NLL under each model
  (the base scores its own answers: an adapter that leaves unrelated prompts alone has drift ≈ 0);
* ``faith`` / ``filter`` / ``refusal`` — the 5L-bench suites built in :mod:`tasks.fivel`.

Per-item values are returned so the gate can bootstrap paired differences.  Metric ``ra_strict`` is
the strict recall of :mod:`tasks.metrics` (the gate's); ``ra`` ("gold contained in the answer"),
``ra_em`` and ``ra_f1`` are kept as secondary metrics.
Suites flagged with ``extras`` also get ``qr`` (cosine between the question's and the answer's
MiniLM embeddings) and ``fl`` (perplexity of the answer, given the question, under the *base*
model: the adapter is switched off to score, so every model is judged by the same reference LM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tasks.metrics import cosine_rows, faithful, gold_contained, interval, is_refusal, mean, score_answers

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, d] embeddings


@dataclass(frozen=True)
class EvalItem:
    question: str
    answer: str
    context: str | tuple[str, ...] | None = None  # one text, or passages numbered in the prompt
    original: str | None = None  # Faith items: the gold answer the counterfactual replaced
    aliases: tuple[str, ...] = ()  # other ways of writing the gold (the same value)
    ref: str | None = None  # what the item is about (a fact id, a document), for per-item reports


SuiteKind = Literal["qa", "faith", "filter", "refusal", "drift"]


@dataclass
class Suite:
    name: str
    items: list[EvalItem]
    mode: str = "closed"  # "closed" | "open"
    nll: bool = False  # also compute teacher-forced gold-answer NLL
    kind: SuiteKind = "qa"  # which scorer applies (see score_suite)
    system: str | None = None  # system prompt for this suite's questions
    extras: tuple[str, ...] = ()  # per-answer extras: "qr", "fl"
    chat: bool = True  # NLL in the chat template (False: the format-neutral plain prompt)

    @property
    def key(self) -> str:
        return self.name if self.mode == "closed" else f"{self.name}:{self.mode}"


@dataclass
class EvalOutput:
    scores: dict[str, dict[str, dict[str, list[float]]]]  # suite key -> model -> metric -> values
    predictions: dict[str, dict[str, list[str]]] = field(
        default_factory=dict
    )  # suite key -> model -> answers


def score_suite(suite: Suite, answers: Sequence[str]) -> dict[str, list[float]]:
    """Per-item scores of one suite's answers, by the suite's kind."""
    items = suite.items
    if suite.kind == "faith":
        return {
            "faith": [faithful(a, it.answer, it.original or "") for a, it in zip(answers, items, strict=True)]
        }
    if suite.kind == "filter":
        return {"filter": [gold_contained(a, it.answer) for a, it in zip(answers, items, strict=True)]}
    if suite.kind == "refusal":
        return {"rr": [is_refusal(a) for a in answers]}
    per_item = score_answers(answers, [it.answer for it in items], [it.aliases for it in items])
    per_item["ra"] = per_item["ra_contains"]
    return per_item


def query_relevance(embed: Embed, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """QR: cosine between question and answer embeddings (0 for an empty answer)."""
    q = embed(list(questions))  # [n, d]
    a = embed([ans if ans.strip() else " " for ans in answers])  # [n, d]
    return [s if ans.strip() else 0.0 for s, ans in zip(cosine_rows(q, a), answers, strict=True)]


class BaseMemo:
    """The base model's answers and NLLs, which do not change between evaluations: computed once
    per base model and kept in one JSON file (keyed by the base checksum, the item, the prompt and
    the generation settings), so each refresh scores only what the adapters change.

    A memo with ``path=None`` keeps results for this process only."""

    VERSION = "1"  # bump when prompt building or decoding changes what the base model would answer

    def __init__(self, path: Path | None, base_sha256: str) -> None:
        import json

        self.path, self.base_sha256 = path, base_sha256
        self.hits = self.misses = 0
        self._data: dict[str, object] = {}
        if path is not None and path.exists():
            try:
                self._data = json.loads(path.read_text())
            except ValueError:  # a torn or foreign file: start again, never fail an evaluation
                self._data = {}
        self._dirty = False

    _salt = ""

    @classmethod
    def for_base(cls, model_cache: Path, base_sha256: str) -> BaseMemo:
        """The memo of one base model, shared by every data home on this machine (evaluation's
        base outputs and the base model's answers to the self-distillation replay prompts)."""
        return cls(model_cache / "evaluations" / f"{base_sha256[:16]}.json", base_sha256)

    def bind(self, model, tokenizer) -> None:
        """Key everything also by what turns an item into the base model's output besides its
        weights: the tokenizer and chat template, the prompt and decoding code (``moe/infer.py``),
        dtype and library versions."""
        import inspect

        import torch
        import transformers

        import moe.infer
        from tasks.text import stable_hash

        dtype = next(iter(model.parameters())).dtype
        template = getattr(tokenizer, "chat_template", None) or ""
        self._salt = stable_hash(
            type(tokenizer).__name__, len(tokenizer), template, inspect.getsource(moe.infer),
            dtype, torch.__version__, transformers.__version__,
        )  # fmt: skip

    def key(self, *parts: object) -> str:
        from tasks.text import stable_hash

        return stable_hash(self.VERSION, self.base_sha256, self._salt, *parts, length=40)

    def many(self, keys: Sequence[str], compute: Callable[[list[int]], list]) -> list:
        """Values for ``keys``; ``compute(missing_rows)`` returns the values of the rows not memoised."""
        missing = [i for i, k in enumerate(keys) if k not in self._data]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, value in zip(missing, compute(missing), strict=True):
                self._data[keys[i]] = value
            self._dirty = True
        return [self._data[k] for k in keys]

    def save(self) -> None:
        from storage.files import write_json_atomic

        if self.path is None or not self._dirty:
            return
        write_json_atomic(self.path, self._data)  # a concurrent writer may win: that only costs a recompute
        self._dirty = False


def _ctx_text(context: object) -> str:
    """A context as key text: one passage and a tuple of passages never collide."""
    if not context:
        return ""
    return f"s:{context}" if isinstance(context, str) else "t:" + "\x1e".join(context)


def base_view(model) -> AbstractContextManager:
    """A context in which ``model`` runs as its base model (MoRAL and peft both offer one)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else nullcontext()


def evaluate_model(
    model,
    tokenizer,
    suites: Sequence[Suite],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    embed: Embed | None = None,
    memo: BaseMemo | None = None,
    is_base: bool = False,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[str]]]:
    """Scores of one model on every suite: one batched generation (and NLL) pass per suite.

    With a ``memo``, what the base model computes (``is_base``: every output; otherwise the FL
    reference scores, which run with the adapter switched off) is looked up first."""
    from moe.infer import answer_nll as _nll
    from moe.infer import generate_answers as _generate

    def generate_answers(
        model, tokenizer, questions, *, contexts, max_new_tokens, batch_size, system, first_line
    ):
        def run(rows: list[int]) -> list[str]:
            return _generate(
                model, tokenizer, [questions[i] for i in rows],
                contexts=None if contexts is None else [contexts[i] for i in rows],
                max_new_tokens=max_new_tokens, batch_size=batch_size, system=system, first_line=first_line,
            )  # fmt: skip

        if memo is None or not is_base:
            return run(list(range(len(questions))))
        ctxs = contexts or [None] * len(questions)
        keys = [
            memo.key("gen-line" if first_line else "gen", system, max_new_tokens, q, _ctx_text(c))
            for q, c in zip(questions, ctxs, strict=True)
        ]
        return memo.many(keys, run)

    def answer_nll(
        model, tokenizer, questions, answers, *, contexts=None, batch_size, chat=True, system=None, base=None
    ):
        def run(rows: list[int]) -> list[float]:
            return _nll(
                model, tokenizer, [questions[i] for i in rows], [answers[i] for i in rows],
                contexts=None if contexts is None else [contexts[i] for i in rows],
                batch_size=batch_size, chat=chat, system=system,
            )  # fmt: skip

        if memo is None or not (is_base if base is None else base):
            return run(list(range(len(questions))))
        ctxs = contexts or [None] * len(questions)
        keys = [
            memo.key("nll", chat, system, q, _ctx_text(c), a)
            for q, c, a in zip(questions, ctxs, answers, strict=True)
        ]
        return memo.many(keys, run)

    scores: dict[str, dict[str, list[float]]] = {}
    preds: dict[str, list[str]] = {}
    for suite in suites:
        if not suite.items:
            continue
        questions = [it.question for it in suite.items]
        golds = [it.answer for it in suite.items]
        contexts = [it.context for it in suite.items] if suite.mode == "open" else None
        if suite.kind == "drift":  # the answers are the base model's: only their NLL is scored
            scores[suite.key] = {
                "nll": answer_nll(
                    model, tokenizer, questions, golds, batch_size=batch_size, system=suite.system
                )
            }
            preds[suite.key] = golds
            continue
        answers = generate_answers(
            model,
            tokenizer,
            questions,
            contexts=contexts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            system=suite.system,
            first_line=suite.kind == "qa",  # the strict metric reads the first line; 5L scorers read all
        )
        per_item = score_suite(suite, answers)
        if suite.nll:
            per_item["nll"] = answer_nll(
                model, tokenizer, questions, golds, contexts=contexts, batch_size=batch_size, chat=suite.chat
            )
        if "qr" in suite.extras and embed is not None:
            per_item["qr"] = query_relevance(embed, questions, answers)
        if "fl" in suite.extras:
            # Empty answers have no tokens to score: FL is over the answers that were given.
            said = [(q, a) for q, a in zip(questions, answers, strict=True) if a.strip()]
            if said:
                with base_view(model):
                    nll = answer_nll(
                        model, tokenizer, [q for q, _ in said], [a for _, a in said], batch_size=batch_size,
                        base=True,
                    )  # fmt: skip
                per_item["fl"] = [float(np.exp(v)) for v in nll]
        scores[suite.key] = per_item
        preds[suite.key] = answers
    return scores, preds


def evaluate_adapters(
    base_path: Path,
    suites: Sequence[Suite],
    adapters: dict[str, Path],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    embed: Embed | None = None,
    progress: Callable[[str], None] | None = None,
    drift_max_new_tokens: int = 48,
    memo: BaseMemo | None = None,
) -> EvalOutput:
    """The base model (scored with the first adapter switched off) and each named adapter.

    One base-model load per adapter (adapters are injected into the model in place), one batched pass
    per suite and model; no per-question reloads. With a ``memo`` the base model's outputs come from
    earlier evaluations where they can (and are saved for later ones).
    """
    from moe.base_model import load_base_model
    from moe.model import load_adapter

    say = progress or (lambda _msg: None)
    out = EvalOutput(scores={}, predictions={})

    suites = list(suites)

    def record(model_name: str, model, tokenizer) -> None:
        if memo is not None and model_name == "base":
            memo.bind(model, tokenizer)
        if model_name == "base":
            suites[:] = with_base_answers(
                model, tokenizer, suites, max_new_tokens=drift_max_new_tokens, memo=memo
            )
        say(f"evaluating {model_name}")
        sc, pr = evaluate_model(
            model, tokenizer, suites, max_new_tokens=max_new_tokens, batch_size=batch_size, embed=embed,
            memo=memo, is_base=model_name == "base",
        )  # fmt: skip
        if memo is not None:
            memo.save()
        for key, metrics in sc.items():
            out.scores.setdefault(key, {})[model_name] = metrics
            out.predictions.setdefault(key, {})[model_name] = pr[key]

    if not adapters:
        base, tokenizer = load_base_model(base_path)
        record("base", base, tokenizer)
        return out
    for i, (name, directory) in enumerate(adapters.items()):
        base, tokenizer = load_base_model(base_path)
        model = load_adapter(base, directory)
        if i == 0:
            with model.disable_adapter():
                record("base", model, tokenizer)
        record(name, model, tokenizer)
        del model, base
    return out


def with_base_answers(
    model, tokenizer, suites: Sequence[Suite], *, max_new_tokens: int = 48, memo: BaseMemo | None = None
) -> list[Suite]:
    """Drift suites whose items have no answer yet get the base model's own greedy answers (``model``
    must run as the base model here; a ``memo`` keeps them across evaluations)."""
    from dataclasses import replace

    from moe.infer import generate_answers

    out = []
    for suite in suites:
        todo = [it for it in suite.items if not it.answer]
        if suite.kind != "drift" or not todo:
            out.append(suite)
            continue
        questions = [it.question for it in todo]

        def run(
            rows: list[int], questions: list[str] = questions, system: str | None = suite.system
        ) -> list[str]:
            return generate_answers(
                model, tokenizer, [questions[i] for i in rows], max_new_tokens=max_new_tokens, system=system
            )

        if memo is None:
            answers = run(list(range(len(questions))))
        else:
            answers = memo.many(
                [memo.key("gen", suite.system, max_new_tokens, q, "") for q in questions], run
            )
        filled = iter(answers)
        items = [replace(it, answer=next(filled) or " ") if not it.answer else it for it in suite.items]
        out.append(replace(suite, items=items))
    return out


def evaluate_versions(
    base_path: Path,
    suites: Sequence[Suite],
    *,
    candidate_dir: Path | None,
    champion_dir: Path | None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    embed: Embed | None = None,
    progress: Callable[[str], None] | None = None,
    memo: BaseMemo | None = None,
) -> EvalOutput:
    """Base (adapter disabled), champion and candidate on the same suites."""
    adapters = {"candidate": candidate_dir} if candidate_dir is not None else {}
    if champion_dir is not None:
        adapters["champion"] = champion_dir
    return evaluate_adapters(
        base_path,
        suites,
        adapters,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        embed=embed,
        progress=progress,
        memo=memo,
    )


def evaluation_rows(output: EvalOutput, suites: Sequence[Suite], seed: int = 0) -> list[dict]:
    """Flatten scores into registry rows: one per (model, suite, mode, metric) with n and a 95% CI."""
    modes = {s.key: (s.name, s.mode) for s in suites}
    rows = []
    for key, by_model in output.scores.items():
        suite, mode = modes.get(key, (key, "closed"))
        for model_name, metrics in by_model.items():
            for metric, values in metrics.items():
                low, high = interval(values, seed=seed)
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
