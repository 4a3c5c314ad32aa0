"""Deterministic answer metrics and confidence intervals; no judge model needed.

Recall accuracy (RA) is scored three ways on SQuAD-normalised text: exact match, token F1 and
"gold contained in the prediction" (small models often answer in a full sentence, which exact match
would call wrong).  Intervals come from a seeded bootstrap so a rerun reproduces them exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from tasks.text import normalize_answer


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_contained(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer appears as a whole-token span of the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    gold_n = normalize_answer(gold)
    return float(bool(gold_n) and f" {gold_n} " in pred)


def score_answers(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, list[float]]:
    """Per-item scores for each RA variant (lists, so callers can bootstrap them)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    return {
        "ra_em": [exact_match(p, g) for p, g in zip(predictions, golds, strict=True)],
        "ra_f1": [token_f1(p, g) for p, g in zip(predictions, golds, strict=True)],
        "ra_contains": [gold_contained(p, g) for p, g in zip(predictions, golds, strict=True)],
    }


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (nan, nan) for an empty sample."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))  # [R, n]
    means = arr[idx].mean(axis=1)  # [R]
    return (float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], *, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of (a - b) over paired items and its percentile bootstrap interval."""
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples differ in size: {xa.shape} vs {xb.shape}")
    if xa.size == 0:
        return (math.nan, math.nan, math.nan)
    diff = xa - xb
    low, high = bootstrap_ci(diff, n_resamples=n_resamples, alpha=alpha, seed=seed)
    return (float(diff.mean()), low, high)


# --- 5L-bench scorers (deterministic; see tasks/fivel.py for how their items are built) -----------

# A refusal is an explicit statement that the answer is not known or not in the passages.  The
# patterns run on lower-cased text with apostrophes unified, so "I don’t know." and "I do not know"
# both match; an empty answer is *not* a refusal (the model said nothing, it did not decline).
_REFUSAL_PATTERNS = (
    r"\bi (?:do not|don't|dont) know\b",
    r"\b(?:i )?(?:cannot|can't|can not|am unable to|unable to) (?:answer|say|tell|determine|find)\b",
    r"\b(?:not|isn't|is not|wasn't|was not) (?:mentioned|stated|given|provided|specified|included)\b",
    r"\b(?:no|not enough) information\b",
    r"\b(?:does|do|did) not (?:say|mention|state|specify|contain|provide|include)\b",
    r"\bdoesn't (?:say|mention|state|specify|contain|provide|include)\b",
    r"\bnot (?:in|found in) the (?:passage|passages|context|text)\b",
    r"^unknown\b",
    r"^(?:no answer|n/a)\b",
)
_REFUSAL_RE = re.compile("|".join(_REFUSAL_PATTERNS))


def is_refusal(prediction: str) -> float:
    """1.0 when the answer declines ("I don't know", "not mentioned in the passages", ...), else 0.0."""
    text = prediction.strip().lower().replace("\u2019", "'").replace("`", "'")
    return float(bool(text) and _REFUSAL_RE.search(text) is not None)


def faithful(prediction: str, counterfactual: str, original: str) -> float:
    """Faith: the answer follows the supplied (counterfactual) context rather than parametric memory:
    it contains the substituted answer and not the original one."""
    return float(
        gold_contained(prediction, counterfactual) == 1.0 and gold_contained(prediction, original) == 0.0
    )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Row-wise cosine similarity of two ``[n, d]`` matrices (rows need not be normalised)."""
    if a.shape != b.shape:
        raise ValueError(f"embedding matrices differ in shape: {a.shape} vs {b.shape}")
    num = (a * b).sum(axis=1)  # [n]
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # [n]
    out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return [float(x) for x in out]
