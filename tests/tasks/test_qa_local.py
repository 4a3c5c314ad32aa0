"""The local answer-aware generator: rules and checks (no model), batching machinery on a tiny model,
and one slow test on the real bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tasks.chunking import Chunk, make_chunk_id
from tasks.qa import Budget, DictCache, generate_for_chunks, validate_pair
from tasks.qa_local import (
    LOCAL_PROMPT_VERSION,
    SHOTS,
    Candidate,
    LocalQAGenerator,
    answer_candidates,
    check_question,
    clean_question,
    select_candidates,
)
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
    return Chunk(make_chunk_id("doc", i, text), "doc", i, 1, text, len(text.split()))


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


# --- batching machinery on a tiny model -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_generator():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), init_std=0.3)
    model.config.max_position_embeddings = 2048
    return LocalQAGenerator(model, tok, model_name="tiny", shots=SHOTS[:1], max_new_tokens=8)


def test_prefix_cache_matches_plain_left_padded_generation(tiny_generator):
    g = tiny_generator
    cands = select_candidates(DRONE, 3) + select_candidates(FERRY, 3)
    prompts = [g._prompt(c) for c in cands]
    got, t_in, t_out = g._complete(prompts)
    tok = g.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = g.model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=g._stop_ids
        )
    ref = [
        tok.decode(r[r != tok.pad_token_id], skip_special_tokens=True)
        for r in out[:, enc["input_ids"].shape[1] :]
    ]
    assert got == ref
    assert t_in == [int(m.sum()) for m in enc["attention_mask"]] and all(0 < n <= 8 for n in t_out)


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
    assert all(p.prompt_version == LOCAL_PROMPT_VERSION and p.generator == "local:tiny" for p in again.pairs)


# --- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_smollm2_writes_valid_questions():
    cache_dir = Path("~/.cache/moral-refresh/models").expanduser()
    g = LocalQAGenerator.load(cache_dir, batch_size=3, num_threads=1)
    texts = [DRONE, BANK, FERRY]
    g.generate_many(texts[:1])  # warm-up: the shared prompt prefix is computed once
    start = time.monotonic()
    res = g.generate_many(texts)
    per_chunk = (time.monotonic() - start) / len(texts)
    for text, r in zip(texts, res, strict=True):
        for p in r.pairs:
            print(f"{p['question']!r} -> {p['answer']!r}")
            assert validate_pair(p["question"], p["answer"], text) is None
    print(f"{per_chunk:.2f} s per chunk")
    assert sum(len(r.pairs) for r in res) >= 2 * len(texts)
    assert all(len(r.pairs) >= 1 for r in res)
