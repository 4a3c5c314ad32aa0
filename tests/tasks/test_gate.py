"""The gate's decision on constructed score tables: promote, reject for forgetting, reject for no gain."""

from __future__ import annotations

from tasks.gate import GateThresholds, decide


def table(
    new_cand, new_ref, world_nll_cand=None, world_nll_ref=None, ref="base", world_ra=None, retention=None
):
    scores = {"new_knowledge": {"candidate": {"ra": new_cand}, ref: {"ra": new_ref}}}
    if world_nll_cand is not None:
        scores["world_knowledge"] = {
            "candidate": {"nll": world_nll_cand, "ra": (world_ra or ([0.0] * len(world_nll_cand), None))[0]},
            ref: {"nll": world_nll_ref, "ra": (world_ra or (None, [0.0] * len(world_nll_ref)))[1]},
        }
        if ref == "champion":  # the cumulative check against the base model
            scores["world_knowledge"]["base"] = {"nll": world_nll_ref, "ra": [0.0] * len(world_nll_ref)}
    if retention is not None:
        scores["retention"] = {"candidate": {"ra": retention[0]}, ref: {"ra": retention[1]}}
    return scores


def test_promotes_a_clear_gain_without_forgetting_small_sample():
    d = decide(
        table([1, 1, 0, 1], [0, 0, 0, 0], [4.0, 4.0], [4.0, 4.0]), GateThresholds(), has_champion=False
    )
    assert d.promote and d.status == "promoted"
    assert any("margin alone decides" in r for r in d.reasons)
    assert all(r.startswith("ok:") for r in d.reasons)


def test_rejects_when_gain_is_below_the_margin():
    d = decide(
        table([0, 1, 0, 0], [0, 1, 0, 0], [4.0], [4.0]), GateThresholds(min_gain=0.05), has_champion=False
    )
    assert not d.promote
    assert d.reasons[0].startswith("rejected: new-knowledge RA")
    assert "below the margin" in d.reasons[0]


def test_rejects_for_forgetting_even_with_a_gain():
    d = decide(
        table([1, 1, 1, 1], [0, 0, 0, 0], [6.0, 6.0], [4.0, 4.0]),
        GateThresholds(max_nll_rise=0.25),
        has_champion=False,
    )
    assert not d.promote
    failed = [c.name for c in d.checks if not c.passed]
    assert failed == ["world_nll_vs_base"]
    assert "+50.0%" in d.reasons[0]


def test_with_a_champion_forgetting_is_also_checked_cumulatively_against_base():
    d = decide(
        table([1] * 4, [0] * 4, [4.5] * 3, [4.0] * 3, ref="champion"), GateThresholds(), has_champion=True
    )
    names = [c.name for c in d.checks]
    assert "world_nll_vs_champion" in names and "world_nll_vs_base" in names
    assert d.promote


def test_large_samples_need_a_ci_that_excludes_zero():
    # n = 40, a mean gain of 0.1 made of noise: +1 on 12 items, -1 on 8 -> CI includes zero.
    cand = [1] * 12 + [0] * 8 + [0] * 20
    ref = [0] * 12 + [1] * 8 + [0] * 20
    d = decide(table(cand, ref), GateThresholds(min_gain=0.05), has_champion=False)
    assert not d.promote and "includes zero" in d.reasons[0]
    d2 = decide(table([1] * 30 + [0] * 10, [0] * 40), GateThresholds(), has_champion=False)
    assert d2.promote and any("excludes zero" in r for r in d2.reasons)


def test_rejects_a_domain_retention_drop():
    d = decide(
        table([1] * 4, [0] * 4, retention=([0, 0, 0, 1], [1, 1, 1, 1])),
        GateThresholds(max_retention_drop=0.1),
        has_champion=False,
    )
    assert not d.promote and [c.name for c in d.checks if not c.passed] == ["domain_retention"]


def test_no_held_out_questions_means_no_promotion():
    d = decide(
        {"new_knowledge": {"candidate": {"ra": []}, "base": {"ra": []}}}, GateThresholds(), has_champion=False
    )
    assert not d.promote and "no held-out" in d.reasons[0]


def test_rejects_forgetting_that_crept_in_across_versions_cumulatively_against_base():
    # Against the champion the NLL rise is only +10%, but the champion itself had drifted from the
    # base: against the base the candidate is +37.5%, beyond the allowed +25%.
    scores = {
        "new_knowledge": {"candidate": {"ra": [1, 1, 1, 1]}, "champion": {"ra": [0, 0, 0, 0]}},
        "world_knowledge": {
            "candidate": {"nll": [5.5, 5.5], "ra": [0.0, 0.0]},
            "champion": {"nll": [5.0, 5.0], "ra": [0.0, 0.0]},
            "base": {"nll": [4.0, 4.0], "ra": [0.0, 0.0]},
        },
    }
    d = decide(scores, GateThresholds(max_nll_rise=0.25), has_champion=True)
    assert not d.promote
    by_name = {c.name: c.passed for c in d.checks}
    assert by_name["world_nll_vs_champion"] is True and by_name["world_nll_vs_base"] is False
    assert d.reasons[0].startswith("rejected: world-knowledge answer NLL") and "vs base" in d.reasons[0]


def test_rejects_a_world_knowledge_accuracy_drop_against_the_champion():
    scores = {
        "new_knowledge": {"candidate": {"ra": [1, 1]}, "champion": {"ra": [0, 0]}},
        "world_knowledge": {
            "candidate": {"nll": [4.0] * 10, "ra": [0.0] * 10},
            "champion": {"nll": [4.0] * 10, "ra": [1.0] + [0.0] * 9},
            "base": {"nll": [4.0] * 10, "ra": [0.0] * 10},
        },
    }
    d = decide(scores, GateThresholds(max_ra_drop=0.05), has_champion=True)
    assert [c.name for c in d.checks if not c.passed] == ["world_ra_vs_champion"]


def test_small_samples_are_decided_by_the_margin_and_the_threshold_is_configurable():
    # n = 10 with a noisy +0.1 gain: below min_n_for_ci the margin alone decides (promote) ...
    cand = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    ref = [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    d = decide(table(cand, ref), GateThresholds(min_gain=0.05, min_n_for_ci=30), has_champion=False)
    assert d.promote and "n=10 < 30, so the margin alone decides" in d.reasons[0]
    # ... and with min_n_for_ci lowered to 10 the CI is required and includes zero (reject).
    d = decide(table(cand, ref), GateThresholds(min_gain=0.05, min_n_for_ci=10), has_champion=False)
    assert not d.promote and "includes zero" in d.reasons[0]


def test_thresholds_come_from_settings(settings):
    s = settings.model_copy(update={"gate_min_gain": 0.2, "gate_min_n_for_ci": 12, "seed": 5})
    t = GateThresholds.from_settings(s)
    assert (t.min_gain, t.min_n_for_ci, t.seed) == (0.2, 12, 5)
    assert t.max_nll_rise == settings.gate_max_nll_rise
