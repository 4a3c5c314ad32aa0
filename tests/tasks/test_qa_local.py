"""The local answer-aware generator: rules and checks (no model), batching machinery on a tiny model,
and one slow test on the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tasks.chunking import Chunk, make_chunk_id
from tasks.qa import Budget, DictCache, cache_key, generate_for_chunks, validate_pair
from tasks.qa_local import (
    LOCAL_PROMPT_VERSION,
    SHOTS,
    Candidate,
    LocalQAGenerator,
    _buckets,
    answer_candidates,
    check_question,
    clean_question,
    framed,
    name_aliases,
    names_entity,
    renamed,
    reworded,
    select_candidates,
    situated,
    synonymed,
)
from tasks.text import normalize_question
from tests.moe.tiny import tiny_llama, tiny_tokenizer

DRONE = (
    "The Quillfeather Q7 is a folding survey drone made by Harbor Labs. The Quillfeather Q7 weighs 1.8 kg "
    "and carries a maximum payload of 2.4 kg. Its battery lasts 42 minutes in calm weather. Harbor Labs "
    "released the Q7 in March 2024 at a price of $1,299."
)
BANK = (
    "Northwind Bank reported a net profit of €412 million for 2023, up 9% from the previous year. The bank "
    "employs 5,300 people in 14 countries. Chief executive Maria Lindqvist said the bank would open 20 new "
    "branches by June 2025."
)
FERRY = (
    "The ferry MV Solstrand entered service on 12 May 2022. She can carry 600 passengers and 180 cars, and "
    "her hybrid engines deliver 9 MW. The crossing between Tromsø and Skjervøy takes 95 minutes."
)


def chunk(text: str, i: int = 0) -> Chunk:
    return Chunk(make_chunk_id("doc", i, text), "doc", i, text, 1, len(text.split()))


# --- rules --------------------------------------------------------------------------------------
def test_answer_candidates_and_openers():
    got = {
        c.answer: (c.kind, c.opener)
        for c in answer_candidates(
            "The Quillfeather Q7 weighs 1.8 kg and carries a maximum payload of 2.4 kg."
        )
    }
    assert got["2.4 kg"] == ("quantity:weight", "What is the maximum payload")
    assert got["1.8 kg"] == ("quantity:weight", "How much")
    assert got["Quillfeather Q7"][0] == "name"  # "The" stripped
    bank = {c.answer: (c.kind, c.opener) for s in (BANK,) for c in answer_candidates(s.split(". ")[0])}
    assert bank["€412 million"] == ("money", "What is the net profit")
    assert bank["9%"][0] == "percent"
    ferry = {c.answer: c.opener for c in answer_candidates(FERRY.split(". ")[0] + ".")}
    assert ferry == {"12 May 2022": "When", "MV Solstrand": "What"}
    people = {c.answer: c.opener for c in answer_candidates("The bank employs 5,300 people in 14 countries.")}
    assert people == {"5,300 people": "How many people", "14 countries": "How many countries"}
    assert {c.kind for c in answer_candidates("It was designed by Ingrid Halvorsen in Bergen.")} == {
        "person",
        "place",
    }


def test_select_candidates_spreads_over_sentences_with_distinct_answers():
    cands = select_candidates(DRONE, 4)
    assert len(cands) == 4 and len({c.answer for c in cands}) == 4
    assert len({c.sentence for c in cands}) >= 3  # one per sentence first
    assert all(
        validate_pair("Is this a question about it?", c.answer, DRONE) != "answer not found in chunk"
        for c in cands
    )  # grounded by construction


@pytest.mark.parametrize(
    ("question", "answer", "ok"),
    [
        ("What is the maximum payload of the Quillfeather Q7?", "2.4 kg", None),
        ("How much does the Quillfeather Q7 weigh?", "1.8 kg", None),
        ("How much does the Quillfeather Q7 weigh?", "2.4 kg", "context"),  # asks about the other number
        ("How many branches will the bank open in 20 months?", "20 new branches", "leaks a number"),
        ("How many branches will Maria Lindqvist open?", "20 new branches", None),
        (
            "How many branches will Maria Lindqvist open in 7 countries?",
            "20 new branches",
            "invents a number",
        ),
        ("What is the answer to the question about the Q7?", "$1,299", "talks about the text"),
        ("How much?", "1.8 kg", "words"),
        ("What is the price of cheese in the shops of Rome?", "$1,299", "not in the text"),
        ("What is the weather like in Paris in spring?", "$1,299", "no content word"),
    ],
)
def test_check_question(question, answer, ok):
    text = DRONE + " " + BANK
    sentence = next(
        s
        for s in (
            "The Quillfeather Q7 weighs 1.8 kg and carries a maximum payload of 2.4 kg.",
            "Harbor Labs released the Q7 in March 2024 at a price of $1,299.",
            "Chief executive Maria Lindqvist said the bank would open 20 new branches by June 2025.",
        )
        if answer in s
    )
    reason = check_question(question, Candidate(sentence, answer, "x", "What", 1), text)
    assert (reason is None) if ok is None else (reason is not None and ok in reason), reason


def test_clean_question():
    assert clean_question("How much", " does it weigh? It weighs a lot.\nMore") == "How much does it weigh?"
    assert clean_question("What is the price", ' of a "Q7"?') == "What is the price of a Q7?"
    assert clean_question("When", "did it ship") == "When did it ship"


@pytest.mark.parametrize(
    ("sentence", "answer", "template"),
    [
        ("The maximum flight speed of the Quillfeather Q7 is 68 km/h.", "68 km/h",
         "What is the maximum flight speed of the Quillfeather Q7?"),
        ("Fees The mooring fee for visiting yachts is 3.20 pounds per metre.", "3.20 pounds",
         "What is the mooring fee for visiting yachts?"),  # a glued heading is skipped
        ("The speed limit inside the inner basin is reduced to 5 knots.", "5 knots",
         "What is the speed limit inside the inner basin?"),
        ("The maximum number of open tickets per agent was raised from 25 to 32.", "32",
         "What is the maximum number of open tickets per agent?"),  # the value now
        ("The chief engineer of the Quillfeather programme is Sigrun Haldorsen.", "Sigrun Haldorsen",
         "Who is the chief engineer of the Quillfeather programme?"),
        ("The data protection officer for the policy is Dr. Ilse Varnholt.", "Ilse Varnholt",
         "Who is the data protection officer for the policy?"),
        ("The release was led by engineering manager Tomasz Wielgosz.", "Tomasz Wielgosz", "Who led the release?"),
        ("Review The Remote Work Committee, chaired by Professor Anand Okereke, meets monthly.", "Anand Okereke",
         "Who chaired the Remote Work Committee?"),
        ("The harbour master, Captain Renske Aalderink, closed the basin.", "Renske Aalderink",
         "Who is the harbour master?"),
        ("The terminal has 6 berths and a cafe.", "6 berths", "How many berths does the terminal have?"),
        ("Staff join the quarterly planning day, called Fen Day, in March.", "Fen Day",
         "What is the quarterly planning day called?"),
        ("Core hours and meetings Core collaboration hours are 10:00 to 15:00 on weekdays.", "10:00 to 15:00",
         "What are the core collaboration hours?"),
        ("The Quillfeather Q7 weighs 1.8 kg.", "1.8 kg", None),  # no "is <answer>": the model words it
        # "<named subject> ... <noun phrase> of <answer>": the model wrote "... of a 2.4 kg quillfeather?"
        ("The Quillfeather Q7 weighs 1.8 kg and carries a maximum payload of 2.4 kg.", "2.4 kg",
         "What is the maximum payload of the Quillfeather Q7?"),
        ("The harbour charges a mooring fee of 12 euros.", "12 euros", None),  # no name to ask about
        ("Its maximum service ceiling is 4,500 metres.", "4,500 metres", None),  # no subject to name
        ("A camera of the Quillfeather Q7 is the Auk-48.", "Auk-48", None),  # not the clause's subject
    ],
)  # fmt: skip
def test_rule_only_templates(sentence, answer, template):
    cand = next(c for c in answer_candidates(sentence) if c.answer == answer)
    assert cand.template == template
    if template:
        assert check_question(template, cand, sentence) is None


def test_answer_spans_avoid_common_traps():
    def spans(s: str) -> dict[str, str]:
        return {c.answer: c.kind for c in answer_candidates(s)}

    assert spans("It applies to all 412 staff across the Marlow Quay campuses.") == {
        "412 staff": "count",  # not "412 staff across"
        "Marlow Quay": "name",
    }
    assert "1 tokens" not in spans("The Plover API uses OAuth 2.1 tokens that expire after 45 minutes.")
    assert "2023 guidelines" not in spans("It replaces the 2023 guidelines of the institute.")
    assert "20 megabytes" not in spans("Attachments larger than 20 megabytes are archived elsewhere.")
    assert spans("The drone was made by Harbor Labs in Oslo.")["Harbor Labs"] == "org"
    assert spans("The weekly meeting takes place every Thursday at 11:30 in the hall.") == {
        "11:30": "time",
        "Thursday": "weekday",
    }
    assert spans("Fees The mooring fee is 3.20 pounds per metre.")["3.20 pounds"] == "money"  # not a weight
    openers = {
        c.answer: c.openers for c in answer_candidates("Requests are recorded in the Tallyhome system.")
    }
    assert openers["Tallyhome"][:2] == ("Which system", "What is the name of the system")
    # then the first opener asked indirectly, and "What is the" for a value
    assert openers["Tallyhome"][2:] == ("Can you tell me what", "Do you know what", "What is the")
    when = {c.answer: c.openers for c in answer_candidates("The pier opened on 8 August 2026.")}[
        "8 August 2026"
    ]
    assert "Can you tell me when" in when and "What is the" not in when  # a date is not a "What is the"
    assert all(len(c.openers) >= 2 for s in (DRONE, BANK, FERRY) for c in answer_candidates(s))


def test_select_candidates_resolves_it_for_the_model():
    cands = select_candidates(
        "The Quillfeather Q7 is a survey drone by Harbor Labs. It was launched on 21 April 2026.", 5
    )
    launch = next(c for c in cands if c.answer == "21 April 2026")
    assert launch.sentence == "It was launched on 21 April 2026."  # checks use the real sentence
    assert launch.fact == "The Quillfeather Q7 was launched on 21 April 2026."  # the model sees the subject


def test_rewordings_and_renamings():
    assert (
        reworded("Who chaired the committee?", "person", "Anand Okereke")
        == "Which person chaired the committee?"
    )
    assert reworded("Which person chaired the committee?", "person", "A B") == "Who chaired the committee?"
    assert reworded("Who made the Q7?", "org", "Harbor Labs") == "Which organisation made the Q7?"
    assert (
        reworded("When was the Q7 released?", "date", "March 2024") == "In which month was the Q7 released?"
    )
    assert (
        reworded("When was the Q7 released?", "date", "5 March 2024") == "On what date was the Q7 released?"
    )
    assert (
        reworded("How many berths does it have?", "count", "6 berths")
        == "What number of berths does it have?"
    )
    assert reworded("How much does the Q7 cost?", "money", "$1,299") == "What does the Q7 cost?"
    assert reworded("Who chaired the committee?", "name", "X Y") is None  # only for people
    aliases = name_aliases(DRONE)
    assert aliases == [("Quillfeather Q7", "Q7")]
    assert renamed("How heavy is the Quillfeather Q7?", aliases) == "How heavy is the Q7?"
    assert (
        renamed("When did Harbor Labs release the Q7?", aliases)
        == "When did Harbor Labs release the Quillfeather Q7?"
    )
    assert renamed("Who made the drone?", aliases) is None


def test_synonyms_reword_in_place_and_leave_names():
    assert synonymed("Who chaired the Remote Work Committee?") == "Who led the Remote Work Committee?"
    assert synonymed("Who led the team?") == "Who chaired the team?"  # both ways
    assert (
        synonymed("What is the maximum payload of the Quillfeather Q7?")
        == "What is the highest payload of the Quillfeather Q7?"
    )
    # every listed word of the question at once; a capitalised one is a name and stays
    assert synonymed("How long is the retention period kept?") == "How long is the storage period retained?"
    assert synonymed("Who is the Chief Harbour Officer?") is None
    assert synonymed("How heavy is the Q7?") is None  # nothing to say another way
    assert synonymed("Speed of the boat?") is None  # nor the first word
    assert synonymed("What is the speedy option?") is None  # whole words only


def test_questions_asking_for_another_kind_of_answer_are_refused():
    sentence = "The Quillfeather Q7 reaches 68 km/h and a service ceiling of 4,500 metres."
    ceiling = next(c for c in answer_candidates(sentence) if c.answer == "4,500 metres")
    assert check_question("What is the maximum speed of the Quillfeather Q7?", ceiling, sentence)
    assert check_question("What is the service ceiling of the Quillfeather Q7?", ceiling, sentence) is None
    kit = "The Quillfeather Q7 kit costs 8,950 euros and includes two batteries."
    batteries = next(c for c in answer_candidates(kit) if c.answer == "two batteries")
    assert batteries.kind == "count"
    assert "another kind" in check_question("What is the total cost of the Quillfeather Q7?", batteries, kit)
    assert check_question("How many batteries does the Quillfeather Q7 kit include?", batteries, kit) is None


def test_buckets_partition_by_length():
    lengths = [40, 3, 41, 2, 39, 3, 0]
    runs = _buckets(lengths, overhead=10)
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in run) for run in runs] == [[0, 2, 3, 3], [39, 40, 41]]
    assert _buckets([5, 5, 5], overhead=10) == [[0, 1, 2]]


# --- batching machinery on a tiny model -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_generator():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), init_std=0.3)
    model.config.max_position_embeddings = 2048
    return LocalQAGenerator(model, tok, model_name="tiny", shots=SHOTS[:1], max_new_tokens=8)


def _plain_generation(g, prompts: list[str], stop_ids: list[int]) -> tuple[list[str], list[int]]:
    """Reference: HF generate on the whole prompts, left-padded, no cache tricks."""
    tok = g.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = g.model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stop_ids
        )
    rows = out[:, enc["input_ids"].shape[1] :]
    return [tok.decode(r[r != tok.pad_token_id], skip_special_tokens=True) for r in rows], [
        int(m.sum()) for m in enc["attention_mask"]
    ]


def test_shared_kv_trie_matches_plain_left_padded_generation(tiny_generator):
    """Sentences shared by several facts, several openers per fact, identical requests, stems and openers
    of very different lengths (several buckets per level) and rows that stop at different steps."""
    g = tiny_generator
    cands = select_candidates(DRONE, 4) + select_candidates(FERRY, 3) + select_candidates(BANK, 5)
    assert len({c.sentence for c in cands}) < len(cands)  # some facts share their sentence
    requests = [
        (*g._segments(c), op) for c in cands for op in (*c.openers[:2], "What is the name of the thing")
    ]
    requests += requests[:3]
    prompts = ["".join(r) for r in requests]
    got, t_in, t_out = g._complete(requests)
    ref, ref_in = _plain_generation(g, prompts, g._stop_ids)
    assert got == ref and t_in == ref_in and all(0 < n <= 8 for n in t_out)
    # Make rows stop early, at different steps: decoding drops them from the batch as they finish.
    stop_ids = g._stop_ids
    g._stop_ids = sorted(
        set(stop_ids) | {g.tokenizer(r[i % 5 + 1 :])["input_ids"][0] for i, r in enumerate(ref[::4])}
    )
    try:
        got, _, t_out = g._complete(requests)
        ref, _ = _plain_generation(g, prompts, g._stop_ids)
    finally:
        g._stop_ids = stop_ids
    assert got == ref and len(set(t_out)) > 3


def test_generate_many_asks_each_fact_in_several_wordings(tiny_generator, monkeypatch):
    """With a scripted model: two distinct, checked questions per fact; rewordings and renamings fill in
    for failed ones; a question written for two answers is dropped; the fact cap holds."""
    g = tiny_generator
    completions = {
        ("2.4 kg", "What is the maximum payload"): " of the Quillfeather Q7?",
        ("2.4 kg", "How much"): " does the Quillfeather Q7 carry?",  # also written for $1,299: ambiguous
        ("$1,299", "What is the price"): " of the Q7?",
        ("$1,299", "How much"): " does the Quillfeather Q7 carry?",
        ("42 minutes", "How long"): " does the battery last in calm weather?",
        ("42 minutes", "How many minutes"): " does the battery last in calm weather?",
        ("1.8 kg", "How much"): " does the Quillfeather Q7 weigh?",
        ("1.8 kg", "How heavy"): " is it in tonnes and grams?",  # invented words: fails the checks
        ("March 2024", "When"): " did Harbor Labs release the Q7?",
        ("March 2024", "In which month"): " was the Q7 released?",
    }
    seen: list[tuple[str, ...]] = []

    def fake_complete(requests):
        seen.extend(requests)
        out = []
        for _, rest, opener in requests:
            answer = rest.split("Answer: ", 1)[1].split("<|im_end|>", 1)[0]
            out.append(completions.get((answer, opener), " is the Harbor Labs drone?"))
        return out, [10] * len(requests), [5] * len(requests)

    monkeypatch.setattr(g, "_complete", fake_complete)
    monkeypatch.setattr(g, "candidates_per_chunk", 6)
    monkeypatch.setattr(g, "pairs_per_chunk", 6)
    res = g.generate_many([DRONE])[0]
    cands = {c.answer: c for c in select_candidates(DRONE, 6)}
    by_answer: dict[str, list[str]] = {}
    for p in res.pairs:
        # a rule-rebuilt wording ("How much weight can ... carry?") passes the checks on its form
        derived = p["question"] in {f for qs in by_answer.values() for q in qs for f in framed(q)}
        assert check_question(p["question"], cands[p["answer"]], DRONE, derived=derived) is None
        by_answer.setdefault(p["answer"], []).append(p["question"])
    assert by_answer == {
        "2.4 kg": [
            "What is the maximum payload of the Quillfeather Q7?",
            "How much weight can the Quillfeather Q7 carry?",  # rebuilt around the measure's verb
        ],
        "$1,299": ["What is the price of the Q7?", "How much does the Q7 cost?"],
        "42 minutes": [
            "How long does the battery last in calm weather?",
            "How many minutes does the battery last in calm weather?",
        ],
        "1.8 kg": ["How much does the Quillfeather Q7 weigh?", "How much does the Q7 weigh?"],
        "March 2024": ["When did Harbor Labs release the Q7?", "In which month was the Q7 released?"],
        # the subject asked for from its relation to Harbor Labs (a rule-only template), then the
        # model's completion of "What"
        "Quillfeather Q7": [
            "What is a folding survey drone made by Harbor Labs?",
            "What is the Harbor Labs drone?",
        ],
    }  # Harbor Labs: "Who is the Harbor Labs drone?" contains its answer
    # All variants of the chunk went to the model in one call: two rows per fact, one fewer for the
    # payload and the drone, whose first wording is a rule-only template.
    assert res.calls == 1 and len(seen) == 2 * len(cands) - 2
    monkeypatch.setattr(g, "pairs_per_chunk", 2)
    assert [p["answer"] for p in g.generate_many([DRONE])[0].pairs] == ["2.4 kg"] * 2 + ["$1,299"] * 2
    monkeypatch.setattr(g, "variants", 1)
    seen.clear()
    one = g.generate_many([DRONE])[0]
    # one wording per fact: the payload's and the drone's templates need no model call
    assert [p["answer"] for p in one.pairs] == ["2.4 kg", "$1,299"] and len(seen) == len(cands) - 2


def test_generate_many_books_one_call_per_batch_and_honours_the_cap(tiny_generator):
    res = tiny_generator.generate_many([DRONE, BANK, "no facts here at all"])
    assert [r.calls for r in res] == [1, 0, 0] and res[2].tokens_in == 0
    assert res[0].tokens_in > 0 and res[1].tokens_out > 0
    capped = tiny_generator.generate_many([DRONE], Budget(max_calls=0))
    assert capped[0].capped and capped[0].calls == 0


def test_local_generator_through_generate_for_chunks(tiny_generator):
    cache = DictCache()
    chunks = [chunk(DRONE, 0), chunk(BANK, 1), chunk(FERRY, 2)]
    tiny_generator.batch_size = 2
    first = generate_for_chunks(chunks, tiny_generator, cache, concurrency=8)
    assert first.llm_calls == 2 and cache.puts == 3 and not first.failed  # 2 batches: [2 chunks], [1]
    again = generate_for_chunks(chunks, tiny_generator, cache, concurrency=8)
    assert again.llm_calls == 0 and again.cache_hits == 3
    assert all(
        p.prompt_version.startswith(LOCAL_PROMPT_VERSION + ":") and p.generator == "local:tiny"
        for p in again.pairs
    )


# --- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_writes_valid_questions_in_two_wordings():
    cache_dir = Path("~/.cache/moral-refresh/models").expanduser()
    g = LocalQAGenerator.load(cache_dir, batch_size=3, num_threads=1)
    texts = [DRONE, BANK, FERRY]
    g.generate_many(texts[:1])  # warm-up: the shared prompt prefix is computed once
    start = time.monotonic()
    res = g.generate_many(texts)
    per_chunk = (time.monotonic() - start) / len(texts)
    two_wordings = 0
    for text, r in zip(texts, res, strict=True):
        by_answer: dict[str, set[str]] = {}
        for p in r.pairs:
            print(f"{p['question']!r} -> {p['answer']!r}")
            assert validate_pair(p["question"], p["answer"], text) is None
            by_answer.setdefault(p["answer"], set()).add(normalize_question(p["question"]))
        assert len({normalize_question(p["question"]) for p in r.pairs}) == len(r.pairs)
        two_wordings += sum(len(qs) >= 2 for qs in by_answer.values())
    print(f"{per_chunk:.2f} s per chunk, {two_wordings} answers asked in two wordings")
    assert sum(len(r.pairs) for r in res) >= 3 * len(texts)
    assert all(len(r.pairs) >= 2 for r in res)
    assert two_wordings >= 3  # at least one fact per fact-dense paragraph, on average


def test_framed_rebuilds_a_measure_question_around_its_verb():
    assert framed("What is the maximum payload of the Quillfeather Q7?") == [
        "How much weight can the Quillfeather Q7 carry?",
        "How much can the Quillfeather Q7 carry?",
    ]
    assert framed("What is the default retention period for closed tickets?")[0] == (
        "How long are closed tickets kept?"  # plural subject: "are"
    )
    assert framed("What is the Q7's weight?")[0] == "How heavy is the Q7?"
    assert framed("What is the name of the harbour's new tug?")[0] == "What is the harbour's new tug called?"
    assert framed("What is the weight of Brisken Aerial Works?")[0].startswith("How heavy is ")  # a name
    assert framed("Who chaired the committee?") == []  # no measure
    assert framed("What is the notice period for staff?") == []  # a bare "period" says no verb


def test_an_appositive_name_gets_a_rule_only_question():
    sentence = (
        "Tidewell Harbour Authority: Bulletin 2026/07 The Tidewell Harbour Authority opened its new "
        "ferry terminal, the Saltmarsh Pier, on 8 August 2026."
    )
    cand = next(c for c in answer_candidates(sentence) if c.answer == "Saltmarsh Pier")
    # the glued heading is skipped; "its" is the sentence's named subject
    assert cand.template == "What is the name of the Tidewell Harbour Authority's new ferry terminal?"
    # and from what happened to it: words far from its description, the same answer
    assert cand.more_templates == (
        "What was opened by the Tidewell Harbour Authority on 8 August 2026?",
        "Which terminal was opened by the Tidewell Harbour Authority on 8 August 2026?",
    )
    assert all(check_question(q, cand, sentence) is None for q in cand.more_templates)
    for other, more in (
        # only the date the clause ends with is kept
        ("The Tidewell Harbour Authority opened its new ferry terminal, the Saltmarsh Pier, on 8 August "
         "2026 after two years of work.", ("What was opened by the Tidewell Harbour Authority?",
                                           "Which terminal was opened by the Tidewell Harbour Authority?")),
        # not the noun phrase the name stands for: nothing asked from the event
        ("The Tidewell Harbour Authority opened its doors to the new ferry terminal, the Saltmarsh Pier.", ()),
        # the owner is not the name right before the verb
        ("The Tidewell Harbour Authority said the town council renamed its ferry terminal, the Saltmarsh "
         "Pier, in 2026.", ()),
    ):  # fmt: skip
        cand = next(c for c in answer_candidates(other) if c.answer == "Saltmarsh Pier")
        assert cand.more_templates == more, other
    cand = next(
        c
        for c in answer_candidates("Visitors love the annual summer fair, the Brinemarket, in June.")
        if c.answer == "Brinemarket"
    )
    assert cand.template == "What is the name of the annual summer fair?"


def test_a_named_subject_is_asked_for_from_its_relation():
    """Reversed direction: the sentence's subject is the answer, asked from the relation to another
    name; never with a number in the kept clause, and cut before a time or another clause."""

    def template(sentence: str, answer: str) -> str | None:
        return next(c for c in answer_candidates(sentence) if c.answer == answer).template

    assert template("Quenby Robotics was founded by Tamsin Vey in 2019.", "Quenby Robotics") == (
        "What was founded by Tamsin Vey?"
    )
    assert template(
        "Fennimore Lane Clinic was founded by Dr. Priya Kalloway in March 2011.", "Fennimore Lane Clinic"
    ) == (
        "What was founded by Dr. Priya Kalloway?"  # "Dr." does not end the clause
    )
    assert template("Quenby Robotics makes the HK-17 Limpet hull-cleaning robot.", "Quenby Robotics") == (
        "What makes the HK-17 Limpet hull-cleaning robot?"  # a digit inside a name is no number
    )
    assert template(
        "The Quillfeather Q7 is a survey drone made by Brisken Aerial Works in Tromso, Norway.",
        "Quillfeather Q7",
    ) == ("What is a survey drone made by Brisken Aerial Works in Tromso?")
    assert template("Quenby Robotics employs 240 engineers in Brindlecombe.", "Quenby Robotics") is None
    assert template("Quenby Robotics was founded in a garage.", "Quenby Robotics") is None  # no other name


def test_a_wrong_measure_completion_does_not_make_the_right_wording_ambiguous(tiny_generator):
    """The model wrote "What is the maximum speed ..." for the ceiling too: that question fails the
    checks for 4,500 metres, so the speed keeps its own rebuilt wordings ("How fast can ... go?")."""
    text = "The maximum flight speed of the Quillfeather Q7 is 68 km/h and its maximum service ceiling is 4,500 metres."
    cands = {c.answer: c for c in answer_candidates(text)}
    speed, ceiling = cands["68 km/h"], cands["4,500 metres"]
    wrong = "What is the maximum speed of the Quillfeather Q7?"
    assert check_question(wrong, ceiling, text) is not None
    asked = [
        (speed, ["What is the maximum flight speed of the Quillfeather Q7?"]),
        (ceiling, [wrong, "What is the maximum service ceiling of the Quillfeather Q7?"]),
    ]
    pairs = tiny_generator._pick(text, asked)
    by_answer: dict[str, list[str]] = {}
    for p in pairs:
        by_answer.setdefault(p["answer"], []).append(p["question"])
    assert "How fast can the Quillfeather Q7 go?" in by_answer["68 km/h"]
    assert wrong not in by_answer["4,500 metres"]
    assert "How high can the Quillfeather Q7 fly?" in by_answer["4,500 metres"]


# --- the document's subject in questions that name nothing ----------------------------------------
RELEASE = (
    "Version 5.2 adds a feature called Quiet Hours. The default retention period for closed tickets is "
    "now 540 days. Lumenvale Orbit now supports 12 languages."
)


def test_a_question_that_names_nothing_is_tied_to_the_subject():
    assert not names_entity("How long are closed tickets kept?")
    assert not names_entity("What time does the club ride leave on Sundays in 2026?")  # calendar, numbers
    assert names_entity("How tall is the Palmhaven House?") and names_entity("When was version 5.2 released?")
    lv, garden = "Lumenvale Orbit 5.2", "the Sandrel Botanic Garden"
    assert (
        situated("How long are closed tickets kept?", lv)
        == "How long are closed tickets kept in Lumenvale Orbit 5.2?"
    )
    assert situated("How many hectares does the garden cover?", garden) == (
        "How many hectares does the Sandrel Botanic Garden cover?"  # its head noun becomes the name
    )
    assert (
        situated("When is the garden's café open?", garden)
        == "When is the Sandrel Botanic Garden's café open?"
    )
    assert situated("How many varieties does the rose garden have?", garden) == (
        "How many varieties does the rose garden have at the Sandrel Botanic Garden?"
    )
    assert situated("How fast do the ferries sail?", "Vellacourt Island Ferries") == (
        "How fast do the ferries sail at Vellacourt Island Ferries?"  # the ships are not the company
    )
    assert situated("How tall is the Palmhaven House?", garden) is None  # names its own
    assert situated("When was version 5.2 released?", lv) is None
    assert situated("How much does a carraway wheeler cost?", "the Carraway Wheelers") is None
    assert situated("How long are closed tickets kept?", None) is None


def test_every_kept_wording_names_the_subject_and_the_fact_keeps_its_wordings(tiny_generator):
    """The situated wording replaces the bare one (the rule-made ones here need no model): six
    distinct wordings of the retention fact, each naming Lumenvale Orbit 5.2."""
    g = tiny_generator
    g.variants = 6
    try:
        bare = {p["question"] for p in g.generate_many([RELEASE])[0].pairs if p["answer"] == "540 days"}
        pairs = g.generate_many([RELEASE], subjects=["Lumenvale Orbit 5.2"])[0].pairs
    finally:
        g.variants = 2
    retention = [p["question"] for p in pairs if p["answer"] == "540 days"]
    assert len(retention) == len(set(retention)) == len(bare) == 6
    assert "How long are closed tickets kept in Lumenvale Orbit 5.2?" in retention
    assert {q.removesuffix(" in Lumenvale Orbit 5.2?") + "?" for q in retention} == bare
    cand = next(c for c in select_candidates(RELEASE, 6) if c.answer == "540 days")
    grounds = f"{RELEASE}\nLumenvale Orbit 5.2"  # the title's "5.2" is no invented number
    assert all(check_question(q, cand, grounds, derived=True) is None for q in retention)


def test_a_wording_whose_answer_is_the_subject_stays_bare(tiny_generator):
    name = next(
        c for c in answer_candidates("Lumenvale Orbit now supports 12 languages.") if c.kind == "name"
    )
    assert name.answer == "Lumenvale Orbit"
    asked = [(name, ["What now supports 12 languages?"])]
    assert tiny_generator._pick(RELEASE, asked, "Lumenvale Orbit 5.2") == [
        {"question": "What now supports 12 languages?", "answer": "Lumenvale Orbit"}  # no answer in it
    ]


def test_a_wording_that_asks_about_nothing_but_the_subject_is_dropped(tiny_generator):
    depot = "The Marrowby Rail Depot services 26 trains every night."
    cand = next(c for c in select_candidates(depot, 6) if c.answer == "26 trains")
    asked = [
        (cand, ["What is the Marrowby Rail Depot?", "How many trains does the Marrowby Rail Depot service?"])
    ]
    assert tiny_generator._pick(depot, asked, "the Marrowby Rail Depot") == [
        {"question": "How many trains does the Marrowby Rail Depot service?", "answer": "26 trains"}
    ]


def test_the_subject_reaches_the_generator_per_chunk_and_keys_its_cache(tiny_generator):
    title = "Lumenvale Orbit 5.2 release notes Lumenvale Orbit is the ticket-routing service of Corvid Lane."
    lv = [
        Chunk(make_chunk_id("lv", i, t), "lv", i, t, 1, len(t.split()))
        for i, t in enumerate([title, RELEASE])
    ]
    other = Chunk(make_chunk_id("x", 3, RELEASE), "x", 3, RELEASE, 1, 20)  # same text, no subject
    cache = DictCache()
    res = generate_for_chunks(
        [*lv, other], tiny_generator, cache, concurrency=1, subjects={"lv": "Lumenvale Orbit 5.2"}
    )
    version, model = tiny_generator.prompt_version, tiny_generator.model_id
    with_subject = cache_key(RELEASE, model, version, "Lumenvale Orbit 5.2")
    assert with_subject != cache_key(RELEASE, model, version) and with_subject in cache.data
    assert cache_key(RELEASE, model, version) in cache.data  # the other document's text: its own reply
    by_chunk: dict[str, set[str]] = {}
    for p in res.pairs:
        if p.answer == "540 days":
            by_chunk.setdefault(p.chunk_id, set()).add(p.question)
    assert all(q.endswith(" in Lumenvale Orbit 5.2?") for q in by_chunk[lv[1].chunk_id])
    assert not any("Lumenvale" in q for q in by_chunk[other.chunk_id])
