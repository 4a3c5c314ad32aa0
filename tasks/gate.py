"""The promotion gate: per-item evaluation scores in, a decision with reasons in words out.

Pure and deterministic (the bootstrap is seeded), so a decision can be re-derived from the stored
scores.  The candidate is compared with the champion (the base model when there is none) and, for
world knowledge, also cumulatively with the base model, so forgetting cannot creep in version by
version.  Suites and metrics are named as the evaluation stage stores them:

* ``new_knowledge`` / ``ra``: the delta's held-out eval pairs, closed-book (1/0 per question);
* ``world_knowledge`` / ``ra`` and ``nll``: the FanOutQA holdout;
* ``retention`` / ``ra``: earlier deltas' held-out pairs (absent on a first refresh).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tasks.metrics import mean, paired_bootstrap_diff

Scores = dict[str, dict[str, dict[str, list[float]]]]  # suite -> model -> metric -> per-item values


@dataclass(frozen=True)
class GateThresholds:
    """Settings of the gate (all also flow parameters)."""

    min_gain: float = 0.05  # new-knowledge RA must rise by at least this over the reference
    max_nll_rise: float = 0.25  # relative rise of world-knowledge NLL allowed vs champion and vs base
    max_ra_drop: float = 0.05  # absolute drop of world-knowledge RA allowed vs champion and vs base
    max_retention_drop: float = 0.10  # absolute drop of domain-retention RA allowed vs champion
    min_n_for_ci: int = 30  # below this sample size the margin alone decides
    seed: int = 0

    @classmethod
    def from_settings(cls, settings) -> GateThresholds:
        """The thresholds a run's settings (``MORAL_GATE_*`` or the flow's parameters) ask for."""
        return cls(
            min_gain=settings.gate_min_gain,
            max_nll_rise=settings.gate_max_nll_rise,
            max_ra_drop=settings.gate_max_ra_drop,
            max_retention_drop=settings.gate_max_retention_drop,
            min_n_for_ci=settings.gate_min_n_for_ci,
            seed=settings.seed,
        )


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

    @property
    def status(self) -> str:
        return "promoted" if self.promote else "rejected"

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def _get(scores: Scores, suite: str, model: str, metric: str) -> list[float] | None:
    values = scores.get(suite, {}).get(model, {}).get(metric)
    return list(values) if values is not None else None


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _new_knowledge_check(scores: Scores, ref: str, t: GateThresholds) -> Check:
    cand = _get(scores, "new_knowledge", "candidate", "ra")
    base = _get(scores, "new_knowledge", ref, "ra")
    if not cand or base is None:
        return Check("new_knowledge_gain", False, "no held-out new-knowledge questions to measure a gain on")
    diff, low, high = paired_bootstrap_diff(cand, base, seed=t.seed)
    n = len(cand)
    values = {"candidate": mean(cand), ref: mean(base), "diff": diff, "ci_low": low, "ci_high": high, "n": n}
    if diff < t.min_gain:
        return Check(
            "new_knowledge_gain",
            False,
            f"new-knowledge RA {_fmt(mean(cand))} vs {ref} {_fmt(mean(base))}: gain {diff:+.3f} is below the "
            f"margin {t.min_gain:.3f} (n={n})",
            values,
        )
    if n >= t.min_n_for_ci and not low > 0:
        return Check(
            "new_knowledge_gain",
            False,
            f"new-knowledge RA gain {diff:+.3f} over {ref}, but its 95% CI [{low:+.3f}, {high:+.3f}] "
            f"includes zero (n={n})",
            values,
        )
    ci_note = (
        f"95% CI [{low:+.3f}, {high:+.3f}] excludes zero"
        if n >= t.min_n_for_ci
        else f"n={n} < {t.min_n_for_ci}, so the margin alone decides"
    )
    return Check(
        "new_knowledge_gain",
        True,
        f"new-knowledge RA {_fmt(mean(cand))} vs {ref} {_fmt(mean(base))}: gain {diff:+.3f} ≥ margin "
        f"{t.min_gain:.3f}; {ci_note}",
        values,
    )


def _world_checks(scores: Scores, refs: list[str], t: GateThresholds) -> list[Check]:
    checks: list[Check] = []
    cand_nll = _get(scores, "world_knowledge", "candidate", "nll")
    cand_ra = _get(scores, "world_knowledge", "candidate", "ra")
    if not cand_nll:
        return [Check("world_knowledge", True, "world-knowledge holdout disabled (size 0): not checked")]
    for ref in refs:
        ref_nll = _get(scores, "world_knowledge", ref, "nll")
        ref_ra = _get(scores, "world_knowledge", ref, "ra")
        if not ref_nll:
            continue
        rise = mean(cand_nll) / mean(ref_nll) - 1.0
        ok = rise <= t.max_nll_rise
        checks.append(
            Check(
                f"world_nll_vs_{ref}",
                ok,
                f"world-knowledge answer NLL {_fmt(mean(cand_nll))} vs {ref} {_fmt(mean(ref_nll))}: "
                f"{rise:+.1%} ({'within' if ok else 'exceeds'} the allowed {t.max_nll_rise:+.0%})",
                {"candidate": mean(cand_nll), ref: mean(ref_nll), "relative_rise": rise, "n": len(cand_nll)},
            )
        )
        if cand_ra and ref_ra:
            drop = mean(ref_ra) - mean(cand_ra)
            ok = drop <= t.max_ra_drop
            checks.append(
                Check(
                    f"world_ra_vs_{ref}",
                    ok,
                    f"world-knowledge RA {_fmt(mean(cand_ra))} vs {ref} {_fmt(mean(ref_ra))}: drop {drop:+.3f} "
                    f"({'within' if ok else 'exceeds'} the allowed {t.max_ra_drop:.3f})",
                    {"candidate": mean(cand_ra), ref: mean(ref_ra), "drop": drop, "n": len(cand_ra)},
                )
            )
    return checks


def _retention_check(scores: Scores, ref: str, t: GateThresholds) -> Check | None:
    cand = _get(scores, "retention", "candidate", "ra")
    base = _get(scores, "retention", ref, "ra")
    if not cand or base is None:
        return None
    drop = mean(base) - mean(cand)
    ok = drop <= t.max_retention_drop
    return Check(
        "domain_retention",
        ok,
        f"domain-retention RA {_fmt(mean(cand))} vs {ref} {_fmt(mean(base))}: drop {drop:+.3f} "
        f"({'within' if ok else 'exceeds'} the allowed {t.max_retention_drop:.3f}, n={len(cand)})",
        {"candidate": mean(cand), ref: mean(base), "drop": drop, "n": len(cand)},
    )


def decide(scores: Scores, thresholds: GateThresholds, *, has_champion: bool) -> Decision:
    """Promote only when every check passes; the reasons list every check, failures first."""
    ref = "champion" if has_champion else "base"
    checks = [_new_knowledge_check(scores, ref, thresholds)]
    checks += _world_checks(scores, ["champion", "base"] if has_champion else ["base"], thresholds)
    retention = _retention_check(scores, ref, thresholds)
    if retention is not None:
        checks.append(retention)
    promote = all(c.passed for c in checks)
    failed = [c.detail for c in checks if not c.passed]
    passed = [c.detail for c in checks if c.passed]
    reasons = [f"rejected: {d}" for d in failed] + [f"ok: {d}" for d in passed]
    return Decision(promote=promote, reasons=reasons, checks=checks)
