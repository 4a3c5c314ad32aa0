"""Deterministic answer metrics and confidence intervals; no judge model needed.

Recall accuracy is scored on text normalised by :mod:`storage.text`:

* ``ra_strict`` (the one the gate reads): the first sentence of the first line of the answer, at
  most ``max(3, len(gold))`` tokens longer than the gold, contains the gold (or one of its aliases)
  and, for a numeric gold, no other number.  A list of candidates, a long hedge or an empty answer
  does not score; "The Q7 carries 2.4 kg." does.
* ``ra_em`` (exact match), ``ra_f1`` (token F1) and ``ra_contains`` ("gold contained anywhere", which
  rewards long answers: Adlakha et al., arXiv 2307.16877) stay as secondary metrics.

Intervals: Wilson for a proportion, seeded percentile bootstrap for a mean or a paired difference,
so a rerun reproduces them exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from storage.text import is_number
from tasks.text import normalize_answer, token_f1


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def gold_contained(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer appears as a whole-token span of the normalised prediction."""
    pred = f" {normalize_answer(prediction)} "
    gold_n = normalize_answer(gold)
    return float(bool(gold_n) and f" {gold_n} " in pred)


# A sentence ends at '.', '!' or '?' followed by white space or the end ("2.4" is not cut), except
# the dot of a title or an initial ("Dr. Ilsa Marrow", "J. Smith").
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_NOT_AN_END = re.compile(r"(?:\b(?:Dr|Mr|Mrs|Ms|Prof|St|Jr|Sr|No|Capt|Gen)|\b[A-Z])$")


def first_sentence(prediction: str) -> str:
    """The first sentence of the first non-empty line of an answer."""
    line = next((ln for ln in prediction.strip().splitlines() if ln.strip()), "")
    for end in _SENTENCE_END.finditer(line):
        if end.group() != "." or not _NOT_AN_END.search(line[: end.start()]):
            return line[: end.start()]
    return line


def _strict_one(sentence_tokens: list[str], gold: str) -> bool:
    gold_tokens = normalize_answer(gold).split()
    if not gold_tokens or len(sentence_tokens) > len(gold_tokens) + max(3, len(gold_tokens)):
        return False
    if f" {' '.join(gold_tokens)} " not in f" {' '.join(sentence_tokens)} ":
        return False
    gold_numbers = {t for t in gold_tokens if is_number(t)}
    return not gold_numbers or all(t in gold_numbers for t in sentence_tokens if is_number(t))


def strict_recall(prediction: str, gold: str, aliases: Sequence[str] = ()) -> float:
    """1.0 when the answer's first sentence states the gold (or an alias) and little else; see the
    module docstring for the rule."""
    sentence_tokens = normalize_answer(first_sentence(prediction)).split()
    if not sentence_tokens:
        return 0.0
    return float(any(_strict_one(sentence_tokens, g) for g in (gold, *aliases)))


def score_answers(
    predictions: Sequence[str], golds: Sequence[str], aliases: Sequence[Sequence[str]] | None = None
) -> dict[str, list[float]]:
    """Per-item scores for each RA variant (lists, so callers can bootstrap them). ``aliases[i]`` are
    other ways of writing gold ``i`` (rewrites of the same value); every variant takes the best."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    alts = [tuple(a) for a in aliases] if aliases is not None else [()] * len(golds)
    if len(alts) != len(golds):
        raise ValueError(f"{len(alts)} alias lists for {len(golds)} gold answers")

    def best(fn, p: str, g: str, more: tuple[str, ...]) -> float:
        return max(fn(p, x) for x in (g, *more))

    rows = list(zip(predictions, golds, alts, strict=True))
    return {
        "ra_strict": [strict_recall(p, g, more) for p, g, more in rows],
        "ra_em": [best(exact_match, p, g, more) for p, g, more in rows],
        "ra_f1": [best(token_f1, p, g, more) for p, g, more in rows],
        "ra_contains": [best(gold_contained, p, g, more) for p, g, more in rows],
    }


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def wilson_ci(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at small n and at 0 or n successes)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def interval(values: Sequence[float], *, seed: int = 0) -> tuple[float, float]:
    """95% interval of a mean: Wilson for 0/1 values, the seeded bootstrap otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size and np.isin(arr, (0.0, 1.0)).all():
        return wilson_ci(float(arr.sum()), int(arr.size))
    return bootstrap_ci(values, seed=seed)


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
