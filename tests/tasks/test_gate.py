"""The gate's one rule on constructed score tables: the paraphrase gain's paired lower bound > 0 and
its point ≥ the minimum; every forgetting check's upper bound within its maximum; too few questions
rejected; an override said first."""

from __future__ import annotations

import pytest

from flows.params import RefreshParams
from flows.refresh import settings_for
from storage.settings import Settings
from tasks.gate import GateThresholds, decide, paired_ratio_ci

N = 40


def table(cand, ref, *, ref_name="base", world=None, drift=None, retention=None, base_world=None):
    """Scores as the evaluation stores them; forgetting suites equal (no forgetting) unless given."""
    world = world or ([4.0] * N, [4.0] * N)
    drift = drift or ([1.0] * N, [1.0] * N)
    scores = {
        "paraphrase": {"candidate": {"ra_strict": cand}, ref_name: {"ra_strict": ref}},
        "world_knowledge": {"candidate": {"nll": world[0]}, ref_name: {"nll": world[1]}},
        "drift": {"candidate": {"nll": drift[0]}, ref_name: {"nll": drift[1]}},
    }
    if ref_name == "champion":  # the cumulative checks against the base model
        scores["world_knowledge"]["base"] = {"nll": base_world or world[1]}
        scores["drift"]["base"] = {"nll": drift[1]}
    if retention is not None:
        scores["retention"] = {
            "candidate": {"ra_strict": retention[0]},
            ref_name: {"ra_strict": retention[1]},
        }
    return scores


CLEAR = ([1] * 30 + [0] * 10, [0] * N)


def failed(d):
    return [c.name for c in d.checks if not c.passed]


def test_promotes_a_clear_gain_without_forgetting():
    d = decide(table(*CLEAR), GateThresholds(), has_champion=False)
    assert d.promote and d.status == "promoted"
    assert all(r.startswith("ok:") for r in d.reasons)
    gain = d.checks[0]
    assert gain.name == "paraphrase_gain" and gain.values["ci_low"] > 0 and gain.values["n"] == N
    assert "95% CI" in d.reasons[0] or any("95% CI" in r for r in d.reasons)


def test_too_few_questions_to_decide_even_with_a_perfect_score():
    d = decide(table([1] * 10, [0] * 10), GateThresholds(min_n=30), has_champion=False)
    assert not d.promote and failed(d) == ["paraphrase_gain"]
    assert "too few questions to decide" in d.reasons[0] and "10 paraphrase questions" in d.reasons[0]
    assert decide(table([1] * 10, [0] * 10), GateThresholds(min_n=10), has_champion=False).promote


def test_a_gain_whose_lower_bound_is_not_above_zero_is_rejected():
    # mean gain +0.1 made of noise: +1 on 12 items, -1 on 8.
    cand = [1] * 12 + [0] * 8 + [0] * 20
    ref = [0] * 12 + [1] * 8 + [0] * 20
    d = decide(table(cand, ref), GateThresholds(min_gain=0.05), has_champion=False)
    assert not d.promote and "lower bound is not above zero" in d.reasons[0]


def test_a_real_but_small_gain_is_below_the_minimum():
    # +1 on 12 of 400 items, never worse: the lower bound is > 0, the point 0.03 < 0.05.
    cand, ref = [1] * 12 + [0] * 388, [0] * 400
    d = decide(
        table(cand, ref, world=([4.0] * 400,) * 2, drift=([1.0] * 400,) * 2),
        GateThresholds(),
        has_champion=False,
    )
    assert not d.promote and "below the minimum gain 0.050" in d.reasons[0]
    assert d.checks[0].values["ci_low"] > 0


def test_forgetting_passes_on_the_upper_bound_not_the_point():
    # World NLL: +5% on average, but noisy: half the items +30%, half -20%: the upper bound exceeds 10%.
    noisy = [5.2] * 20 + [3.2] * 20
    d = decide(table(*CLEAR, world=(noisy, [4.0] * N)), GateThresholds(max_nll_rise=0.10), has_champion=False)
    check = next(c for c in d.checks if c.name == "world_knowledge_nll_vs_base")
    assert check.values["relative_rise"] < 0.10 < check.values["ci_high"]
    assert not d.promote and failed(d) == ["world_knowledge_nll_vs_base"]
    steady = [4.2] * N  # +5% on every item: the interval is tight and within +10%
    assert decide(
        table(*CLEAR, world=(steady, [4.0] * N)), GateThresholds(max_nll_rise=0.10), has_champion=False
    ).promote


def test_drift_beyond_its_maximum_rejects():
    d = decide(
        table(*CLEAR, drift=([1.03] * N, [1.0] * N)), GateThresholds(max_drift=0.02), has_champion=False
    )
    assert not d.promote and failed(d) == ["drift_nll_vs_base"]
    assert "+3.0%" in d.reasons[0]
    assert decide(
        table(*CLEAR, drift=([1.01] * N, [1.0] * N)), GateThresholds(max_drift=0.02), has_champion=False
    ).promote


def test_with_a_champion_forgetting_is_also_checked_cumulatively_against_base():
    # +10% against the champion, but the champion had drifted from the base: +37.5% against the base.
    d = decide(
        table(*CLEAR, ref_name="champion", world=([5.5] * N, [5.0] * N), base_world=[4.0] * N),
        GateThresholds(max_nll_rise=0.25),
        has_champion=True,
    )
    assert not d.promote and failed(d) == ["world_knowledge_nll_vs_base"]
    names = {c.name for c in d.checks}
    assert {"world_knowledge_nll_vs_champion", "drift_nll_vs_champion", "drift_nll_vs_base"} <= names


def test_rejects_a_domain_retention_drop_by_its_upper_bound():
    cand = [1] * 36 + [0] * 4  # a drop of 0.10 ...
    d = decide(
        table(*CLEAR, retention=(cand, [1] * N)), GateThresholds(max_retention_drop=0.10), has_champion=False
    )
    check = next(c for c in d.checks if c.name == "domain_retention")
    assert (
        check.values["drop"] == pytest.approx(0.1) and check.values["ci_high"] > 0.1
    )  # ... whose bound is above
    assert not d.promote and failed(d) == ["domain_retention"]


def test_missing_forgetting_suites_reject_unless_overridden():
    scores = table(*CLEAR)
    del scores["drift"]
    d = decide(scores, GateThresholds(), has_champion=False)
    assert not d.promote and "no drift prompts were scored" in d.reasons[0]
    d = decide(scores, GateThresholds(override="drift measured elsewhere"), has_champion=False)
    assert d.promote and d.reasons[0] == "override: drift measured elsewhere"
    assert d.to_dict()["override"] == "drift measured elsewhere"


def test_paired_ratio_interval():
    point, low, high = paired_ratio_ci([2.0] * 10, [1.0] * 10)
    assert point == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    with pytest.raises(ValueError):
        paired_ratio_ci([1.0], [1.0, 2.0])


def test_thresholds_come_from_settings(settings):
    s = settings.model_copy(
        update={"gate_min_gain": 0.2, "gate_min_n": 12, "gate_max_drift": 0.01, "seed": 5}
    )
    t = GateThresholds.from_settings(s)
    assert (t.min_gain, t.min_n, t.max_drift, t.seed) == (0.2, 12, 0.01, 5)
    assert t.max_nll_rise == settings.gate_max_nll_rise


@pytest.mark.parametrize(
    "weakening",
    [
        {"gate_min_gain": -0.1},
        {"holdout_size": 0},
        {"holdout_size": 5},
        {"drift_size": 0},
        {"drift_size": 4},
        {"gate_min_n": 1},
        {"gate_max_nll_rise": 1.5},
        {"gate_max_drift": 0.99},
        {"gate_max_retention_drop": 0.9},
    ],
)
def test_settings_that_switch_a_check_off_are_refused_without_an_override(weakening, tmp_path, monkeypatch):
    key, value = next(iter(weakening.items()))
    with pytest.raises(ValueError, match="gate_override"):
        Settings(home=tmp_path, **weakening)
    monkeypatch.setenv(f"MORAL_{key.upper()}", str(value))  # as a MORAL_* setting too
    with pytest.raises(ValueError, match="switch a gate check off"):
        Settings(home=tmp_path)
    monkeypatch.setenv("MORAL_GATE_OVERRIDE", "measuring the base model only")
    assert Settings(home=tmp_path).gate_weakened()
    monkeypatch.delenv("MORAL_GATE_OVERRIDE")
    monkeypatch.delenv(f"MORAL_{key.upper()}")
    # ... and as a run parameter (the Prefect Run form and `moral refresh` build RefreshParams).
    base = Settings(home=tmp_path)
    with pytest.raises(ValueError, match="switch a gate check off"):
        settings_for(RefreshParams(**weakening), base)
    s = settings_for(RefreshParams(**weakening, gate_override="a reason"), base)
    assert s.gate_override == "a reason" and getattr(s, key) == value
    with pytest.raises(ValueError, match="needs a reason"):
        Settings(home=tmp_path, gate_override="  ")


def test_a_forgetting_check_without_reference_scores_fails_instead_of_vanishing():
    scores = table(*CLEAR)
    del scores["world_knowledge"]["base"]
    d = decide(scores, GateThresholds(), has_champion=False)
    assert not d.promote and failed(d) == ["world_knowledge_nll_vs_base"]
    assert "no paired base scores" in d.reasons[0]


def test_no_paraphrase_questions_at_all_is_too_few_to_decide():
    scores = table(*CLEAR)
    del scores["paraphrase"]  # an empty suite is not scored
    d = decide(scores, GateThresholds(), has_champion=False)
    assert not d.promote and "too few questions to decide: 0 paraphrase questions" in d.reasons[0]
    scores = table(*CLEAR)
    del scores["paraphrase"]["base"]
    d = decide(scores, GateThresholds(), has_champion=False)
    assert not d.promote and "no paired base scores on the paraphrase questions" in d.reasons[0]
