"""The promotion gate: per-item evaluation scores in, a decision with reasons in words out.

Pure and deterministic (the bootstrap is seeded), so a decision can be re-derived from the stored
scores.  The candidate is compared with the champion (the base model when there is none) and, for
forgetting, also cumulatively with the base model, so it cannot creep in version by version.

One rule, every check with a paired 95% interval:

* **gain** (``paraphrase`` / ``ra_strict``): facts trained in other wordings, asked in words far from
  every trained one.  Promote only when the paired lower bound of the gain over the reference is > 0
  and its point estimate ≥ ``min_gain``; with fewer than ``min_n`` questions: rejected, too few to
  decide.
* **forgetting** passes when the *upper* bound is within its maximum:
  ``world_knowledge`` / ``nll`` (FanOutQA gold answers, format-neutral prompt): relative rise;
  ``drift`` / ``nll`` (the base model's own answers to general prompts): relative rise;
  ``retention`` / ``ra_strict`` (held-out pairs of earlier versions' documents): absolute drop.

A run with ``override`` (a reason) says so first in the reasons of its decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from tasks.metrics import mean, paired_bootstrap_diff

Scores = dict[str, dict[str, dict[str, list[float]]]]  # suite -> model -> metric -> per-item values

GAIN_SUITE = "paraphrase"
GAIN_METRIC = "ra_strict"


@dataclass(frozen=True)
class GateThresholds:
    """Settings of the gate (all also flow parameters)."""

    min_gain: float = 0.05  # paraphrase strict recall must rise by at least this over the reference
    min_n: int = 30  # fewer gain questions: too few to decide
    max_nll_rise: float = 0.10  # relative rise of world-knowledge NLL (upper bound), vs champion and base
    max_drift: float = 0.02  # relative rise of the NLL of the base model's own answers (upper bound)
    max_retention_drop: float = 0.10  # absolute drop of domain-retention strict recall (upper bound)
    override: str | None = None  # the reason a run weakened a check, if it did
    seed: int = 0

    @classmethod
    def from_settings(cls, settings) -> GateThresholds:
        """The thresholds a run's settings (``MORAL_GATE_*`` or the flow's parameters) ask for."""
        return cls(
            min_gain=settings.gate_min_gain,
            min_n=settings.gate_min_n,
            max_nll_rise=settings.gate_max_nll_rise,
            max_drift=settings.gate_max_drift,
            max_retention_drop=settings.gate_max_retention_drop,
            override=settings.gate_override,
            seed=settings.seed,
        )


def paired_ratio_ci(
    cand: Sequence[float], ref: Sequence[float], *, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Relative rise mean(cand)/mean(ref) - 1 over paired items, with its percentile bootstrap 95%."""
    c, r = np.asarray(cand, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if c.shape != r.shape or c.size == 0:
        raise ValueError(f"paired samples differ or are empty: {c.shape} vs {r.shape}")
    idx = np.random.default_rng(seed).integers(0, c.size, size=(n_resamples, c.size))
    ratios = c[idx].mean(axis=1) / np.maximum(r[idx].mean(axis=1), 1e-12) - 1.0
    point = float(c.mean() / max(r.mean(), 1e-12) - 1.0)
    return point, float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    checks: list[Check]
    override: str | None = None

    @property
    def status(self) -> str:
        return "promoted" if self.promote else "rejected"

    def to_dict(self) -> dict:
        return {
            "promote": self.promote,
            "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks],
            "override": self.override,
        }


def _get(scores: Scores, suite: str, model: str, metric: str) -> list[float] | None:
    values = scores.get(suite, {}).get(model, {}).get(metric)
    return list(values) if values is not None else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _gain_check(scores: Scores, ref: str, t: GateThresholds) -> Check:
    name = "paraphrase_gain"
    cand = _get(scores, GAIN_SUITE, "candidate", GAIN_METRIC)
    base = _get(scores, GAIN_SUITE, ref, GAIN_METRIC)
    n = len(cand or [])
    if n and (base is None or len(base) != n):
        return Check(
            name, False, f"no paired {ref} scores on the paraphrase questions to compare with", {"n": n}
        )
    if n < t.min_n or base is None:
        return Check(
            name,
            False,
            f"too few questions to decide: {n} paraphrase questions, at least {t.min_n} needed "
            "(more documents, or more wordings per fact)",
            {"n": n},
        )
    diff, low, high = paired_bootstrap_diff(cand, base, seed=t.seed)
    values = {"candidate": mean(cand), ref: mean(base), "diff": diff, "ci_low": low, "ci_high": high, "n": n}
    summary = (
        f"paraphrase strict recall {_fmt(mean(cand))} vs {ref} {_fmt(mean(base))}: gain {diff:+.3f}, "
        f"95% CI [{low:+.3f}, {high:+.3f}] (n={n})"
    )
    if not low > 0:
        return Check(name, False, f"{summary}: the lower bound is not above zero", values)
    if diff < t.min_gain:
        return Check(name, False, f"{summary}: below the minimum gain {t.min_gain:.3f}", values)
    return Check(name, True, f"{summary}: lower bound > 0 and gain ≥ {t.min_gain:.3f}", values)


def _rise_check(
    scores: Scores, suite: str, ref: str, limit: float, label: str, name: str, t: GateThresholds
) -> Check | None:
    cand = _get(scores, suite, "candidate", "nll")
    other = _get(scores, suite, ref, "nll")
    if not cand:
        return None
    if not other or len(other) != len(cand):
        return Check(name, False, f"{label}: no paired {ref} scores to compare the candidate with")
    rise, low, high = paired_ratio_ci(cand, other, seed=t.seed)
    ok = high <= limit
    return Check(
        name,
        ok,
        f"{label} {_fmt(mean(cand))} vs {ref} {_fmt(mean(other))}: {rise:+.1%}, 95% CI [{low:+.1%}, "
        f"{high:+.1%}] (upper bound {'is within' if ok else 'exceeds'} the allowed {limit:+.1%}, n={len(cand)})",
        {"candidate": mean(cand), ref: mean(other), "relative_rise": rise, "ci_low": low, "ci_high": high,
         "n": len(cand)},
    )  # fmt: skip


def _forgetting_checks(scores: Scores, refs: list[str], t: GateThresholds) -> list[Check]:
    checks: list[Check] = []
    for suite, label, limit, missing in (
        ("world_knowledge", "world-knowledge answer NLL", t.max_nll_rise, "world-knowledge holdout"),
        ("drift", "drift (NLL of the base model's own answers)", t.max_drift, "drift prompts"),
    ):
        if not _get(scores, suite, "candidate", "nll"):
            checks.append(Check(f"{suite}_nll", bool(t.override), f"no {missing} were scored: not checked"))
            continue
        for ref in refs:
            check = _rise_check(scores, suite, ref, limit, label, f"{suite}_nll_vs_{ref}", t)
            if check is not None:
                checks.append(check)
    return checks


def _retention_check(scores: Scores, ref: str, t: GateThresholds) -> Check | None:
    cand = _get(scores, "retention", "candidate", GAIN_METRIC)
    other = _get(scores, "retention", ref, GAIN_METRIC)
    if not cand or other is None:
        return None
    drop, low, high = paired_bootstrap_diff(other, cand, seed=t.seed)
    ok = high <= t.max_retention_drop
    return Check(
        "domain_retention",
        ok,
        f"domain-retention strict recall {_fmt(mean(cand))} vs {ref} {_fmt(mean(other))}: drop {drop:+.3f}, "
        f"95% CI [{low:+.3f}, {high:+.3f}] (upper bound {'is within' if ok else 'exceeds'} the allowed "
        f"{t.max_retention_drop:.3f}, n={len(cand)})",
        {
            "candidate": mean(cand),
            ref: mean(other),
            "drop": drop,
            "ci_low": low,
            "ci_high": high,
            "n": len(cand),
        },
    )


def decide(scores: Scores, thresholds: GateThresholds, *, has_champion: bool) -> Decision:
    """Promote only when every check passes; the reasons list the override first, then every check,
    failures first."""
    ref = "champion" if has_champion else "base"
    checks = [_gain_check(scores, ref, thresholds)]
    checks += _forgetting_checks(scores, ["champion", "base"] if has_champion else ["base"], thresholds)
    retention = _retention_check(scores, ref, thresholds)
    if retention is not None:
        checks.append(retention)
    promote = all(c.passed for c in checks)
    failed = [c.detail for c in checks if not c.passed]
    passed = [c.detail for c in checks if c.passed]
    override = [f"override: {thresholds.override}"] if thresholds.override else []
    reasons = override + [f"rejected: {d}" for d in failed] + [f"ok: {d}" for d in passed]
    return Decision(promote=promote, reasons=reasons, checks=checks, override=thresholds.override)
