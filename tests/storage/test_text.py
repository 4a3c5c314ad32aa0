"""The one answer normalisation: what changes a fact stays, what does not is unified."""

from __future__ import annotations

import pytest

from storage.text import fact_key, normalize_answer, normalize_question, numbers


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("2.4", "24"),
        ("2.4 kg", "24 kg"),
        ("3.6 m", "36 m"),
        ("−3", "3"),
        ("-3 °C", "3 °C"),
        ("1,15", "115"),  # not three digits after the comma: not a thousands separator
        ("v2.4.1", "v2.41"),
        ("6:15", "61:5"),
        (".5 mm", "5 mm"),  # a bare decimal keeps its point
        ("$1,150", "€1,150"),  # another currency is another fact
    ],
)
def test_what_changes_a_fact_is_kept(a, b):
    assert normalize_answer(a) != normalize_answer(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1,150", "1150"),
        ("€1,150,000", "€1150000"),
        ("06:15", "6:15"),
        ("The Harbour", "harbour"),
        ("an Apple", "APPLE"),
        ("Tromsø Café", "tromsø cafe"),
        ("ＡＢＣ １２", "abc 12"),  # full-width forms (NFKC)
        ("2.4kg", "2.4 kg"),
        ("12%", "12 percent"),
        ("−3", "-3"),  # the Unicode minus sign is a minus sign
        ("2.4.", "2.4"),  # a full stop after a number is not a decimal point
        ("Merlin-RTK", "merlin rtk"),
        ("  many   spaces\n", "many spaces"),
        (".5 mm", "0.5 mm"),
        ("Answer:5", "answer 5"),  # a colon after a word is punctuation, not a time
    ],
)
def test_what_does_not_change_a_fact_is_unified(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_numbers_are_tokens_of_their_own_and_codes_are_not_numbers():
    assert numbers("The Q7 carries 2.4 kg, costs €8,950 and leaves at 06:15 on 3 May") == [
        "2.4",
        "8950",
        "6:15",
        "3",
    ]
    assert numbers("IP54 rating, Auk-48 camera") == ["48"]  # "Auk-48": a hyphen between, not a sign
    assert numbers("between -20 and 45") == ["-20", "45"]


def test_questions_keep_their_articles_answers_do_not():
    assert normalize_question("What is the payload?") == "what is the payload"
    assert normalize_answer("the payload") == "payload"


def test_a_fact_is_its_value():
    assert fact_key("2.4 kg") == fact_key("2.4 kilograms") == fact_key("about 2.4 kg")
    assert fact_key("2.4 kg") != fact_key("24 kg") and fact_key("2.4 kg") != fact_key("2.4 m")
    assert fact_key("7/8/2021") != fact_key("8/7/2021")  # order matters
    assert fact_key("Sigrun Haldorsen") == fact_key("sigrun haldorsen.")
