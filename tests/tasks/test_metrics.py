"""Answer metrics on hand-made cases, and bootstrap determinism."""

from __future__ import annotations

import math

import pytest

from tasks.metrics import (
    bootstrap_ci,
    exact_match,
    gold_contained,
    paired_bootstrap_diff,
    score_answers,
    token_f1,
)


def test_exact_match_uses_squad_normalisation():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0


def test_token_f1_golden_values():
    assert token_f1("2.4 kg", "2.4 kg") == 1.0
    # Normalised: pred "maximum payload is 24 kg" (5 tokens), gold "24 kg" (2): P=2/5, R=1 -> F1 = 4/7
    assert token_f1("The maximum payload is 2.4 kg", "2.4 kg") == pytest.approx(4 / 7)
    assert token_f1("nothing", "2.4 kg") == 0.0


def test_gold_contained_matches_whole_tokens_only():
    assert gold_contained("It carries a maximum payload of 2.4 kg.", "2.4 kg") == 1.0
    assert gold_contained("It weighs 12.4 kg", "2.4 kg") == 0.0
    assert gold_contained("anything", "") == 0.0


def test_score_answers_lengths_must_match():
    with pytest.raises(ValueError):
        score_answers(["a"], ["a", "b"])
    scores = score_answers(["Paris", "It is Rome"], ["paris", "Rome"])
    assert scores["ra_em"] == [1.0, 0.0]
    assert scores["ra_contains"] == [1.0, 1.0]


def test_bootstrap_is_deterministic_under_a_seed_and_brackets_the_mean():
    values = [0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.3, 0.95, 0.5, 0.9]
    a = bootstrap_ci(values, seed=7)
    assert a == bootstrap_ci(values, seed=7)
    assert a != bootstrap_ci(values, seed=8)
    assert a[0] <= sum(values) / len(values) <= a[1]
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_paired_difference_of_identical_samples_is_exactly_zero():
    diff, low, high = paired_bootstrap_diff([1, 0, 1], [1, 0, 1])
    assert (diff, low, high) == (0.0, 0.0, 0.0)
    diff, low, high = paired_bootstrap_diff([1.0] * 40, [0.0] * 40)
    assert diff == low == high == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1], [1, 2])


def test_refusal_detector_golden_cases():
    from tasks.metrics import is_refusal

    refusals = [
        "I don't know.",
        "I don’t know",
        "I do not know the answer.",
        "The passages do not mention the launch date.",
        "This is not mentioned in the passages.",
        "There is no information about that.",
        "Unknown",
        "I cannot answer that from the context.",
    ]
    answers = ["Paris", "It was founded in 1998.", "Known for its bridges", "", "No. 5 is the answer"]
    assert [is_refusal(r) for r in refusals] == [1.0] * len(refusals)
    assert [is_refusal(a) for a in answers] == [0.0] * len(answers)


def test_faithful_needs_the_counterfactual_and_not_the_original():
    from tasks.metrics import faithful

    assert faithful("It weighs 7.5 kg.", "7.5 kg", "2.4 kg") == 1.0
    assert faithful("It weighs 2.4 kg.", "7.5 kg", "2.4 kg") == 0.0
    assert faithful("Either 2.4 kg or 7.5 kg", "7.5 kg", "2.4 kg") == 0.0


def test_cosine_rows_golden_values():
    import numpy as np

    from tasks.metrics import cosine_rows

    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert cosine_rows(a, b) == pytest.approx([1.0, 2**-0.5, 0.0])
    with pytest.raises(ValueError):
        cosine_rows(a, b[:2])


def test_paired_bootstrap_is_deterministic_under_a_seed():
    a = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    b = [0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    assert paired_bootstrap_diff(a, b, seed=3) == paired_bootstrap_diff(a, b, seed=3)
    diff, low, high = paired_bootstrap_diff(a, b, seed=3)
    assert diff == pytest.approx(0.4) and low <= diff <= high


# --- strict recall ---------------------------------------------------------------------------------
from tasks.metrics import first_sentence, strict_recall, wilson_ci  # noqa: E402


def test_gold_contained_no_longer_confuses_decimals():
    assert gold_contained("The payload is 24 kg", "2.4 kg") == 0.0
    assert gold_contained("The payload is 2.4 kg", "2.4 kg") == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "2.4 kg",
        "The Q7 carries 2.4 kg.",  # the 7 of a code is not another number
        "2.4 kg. The Q7 also weighs 1.8 kg.",  # only the first sentence is read
        "The payload is 2.4 kilograms",  # an alias
        "2.4 kg\nor maybe 3.1 kg",  # only the first line
    ],
)
def test_strict_recall_credits_a_short_answer_that_states_the_gold(answer):
    assert strict_recall(answer, "2.4 kg", ["2.4 kilograms"]) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   \n  ",
        "2.4 kg, 3.1 kg or 5 kg",  # a list of numbers
        "Either 1.8 kg or 2.4 kg",  # another number
        "It is hard to say, but depending on the configuration it could perhaps be about 2.4 kg",  # a hedge
        "24 kg",
        "The payload is not stated. 2.4 kg",  # the gold is not in the first sentence
    ],
)
def test_strict_recall_refuses_lists_hedges_and_empty_answers(answer):
    assert strict_recall(answer, "2.4 kg") == 0.0


def test_strict_recall_length_cap_scales_with_the_gold():
    gold = "Sigrun Haldorsen"  # 2 tokens: at most 2 + 3 = 5 tokens in the answer
    assert strict_recall("The engineer is Sigrun Haldorsen.", gold) == 1.0  # 5 tokens ("the" dropped: 4)
    assert strict_recall("Sigrun Haldorsen, Ilsa Marrow and Tom Berg", gold) == 0.0
    long_gold = "the Brisken Aerial Works factory in Tromso Norway"  # 7 tokens: cap 14
    assert (
        strict_recall("It was built at the Brisken Aerial Works factory in Tromso Norway.", long_gold) == 1.0
    )


def test_first_sentence_keeps_decimals_and_titles():
    assert first_sentence("It is 2.4 kg. Next.") == "It is 2.4 kg"
    assert first_sentence("Dr. Ilsa Marrow led it. She") == "Dr. Ilsa Marrow led it"
    assert first_sentence("Really? Yes.") == "Really"


def test_score_answers_has_strict_and_secondary_metrics_with_aliases():
    out = score_answers(
        ["1150 euros", "The price is €1,150 or so, maybe more, hard to say really"],
        ["€1,150"] * 2,
        [["1,150 euros"], ["1,150 euros"]],
    )
    assert out["ra_strict"] == [1.0, 0.0]
    assert out["ra_contains"] == [1.0, 1.0]  # the lenient metric is kept, and is gamed by the hedge
    assert set(out) == {"ra_strict", "ra_em", "ra_f1", "ra_contains"}


def test_wilson_interval():
    low, high = wilson_ci(3, 12)
    assert 0.08 < low < 0.10 and 0.52 < high < 0.54
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == pytest.approx(1.0)
