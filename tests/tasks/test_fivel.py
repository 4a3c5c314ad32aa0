"""5L-bench items built from hand-made passages: counterfactuals, distractors, refusal contexts."""

from __future__ import annotations

from tasks.fivel import FIVEL_SYSTEM, SourcedPair, faith_items, filter_items, fivel_suites, refusal_items

PAIRS = [
    SourcedPair("How heavy is the Kestrel drone?", "2.4 kg", "The Kestrel drone weighs 2.4 kg empty.", "d1"),
    SourcedPair("Who founded Brightwater?", "Ada Lin", "Brightwater was founded by Ada Lin in 1998.", "d2"),
    SourcedPair("Where is the Orla plant?", "Tromsø", "The Orla plant is in Tromsø, near the fjord.", "d3"),
    SourcedPair("What colour is the logo?", "teal", "Its logo is blue.", "d1"),  # answer not in passage
]
POOL = [
    ("d1", "The Kestrel drone weighs 2.4 kg empty."),
    ("d2", "Brightwater was founded by Ada Lin in 1998."),
    ("d3", "The Orla plant is in Tromsø, near the fjord."),
    ("d4", "Quarterly revenue rose by four percent."),
]


def test_faith_items_swap_the_gold_answer_for_another_pairs_answer():
    items = faith_items(PAIRS, size=10, seed=0)
    assert len(items) == 3  # the pair whose answer is not in its passage cannot be swapped
    for it in items:
        source = next(p for p in PAIRS if p.question == it.question)
        assert it.original == source.answer and it.answer != source.answer
        assert it.answer in {p.answer for p in PAIRS[:3]}
        (context,) = it.context
        assert source.answer not in context and it.answer in context
        # Only the answer changed: the passage with the substitute put back is the original.
        assert context.replace(it.answer, source.answer) == source.passage
    assert faith_items(PAIRS, size=10, seed=0) == items  # deterministic under the seed
    assert len(faith_items(PAIRS, size=2, seed=0)) == 2


def test_filter_items_mix_the_source_passage_with_other_documents_distractors():
    items = filter_items(PAIRS[:3], POOL, size=3, k=2, seed=0)
    assert len(items) == 3
    for it, pair in zip(items, PAIRS[:3], strict=True):
        assert len(it.context) == 3 and pair.passage in it.context
        others = [c for c in it.context if c != pair.passage]
        assert all(pair.answer not in c for c in others)
        assert all(dict((t, d) for d, t in POOL)[c] != pair.doc_id for c in others)
    assert filter_items(PAIRS[:3], POOL, size=3, k=2, seed=0) == items


def test_refusal_items_never_contain_the_answer():
    items = refusal_items(PAIRS[:3], POOL, size=3, k=2, seed=0)
    assert len(items) == 3
    for it, pair in zip(items, PAIRS[:3], strict=True):
        assert pair.passage not in it.context
        assert all(pair.answer.lower() not in c.lower() for c in it.context)


def test_fivel_suites_are_open_book_with_the_refusal_instruction():
    suites = fivel_suites(PAIRS, POOL, size=2, k=1, seed=0)
    assert [(s.name, s.kind, s.mode) for s in suites] == [
        ("faith", "faith", "open"), ("filter", "filter", "open"), ("refusal", "refusal", "open"),
    ]  # fmt: skip
    assert all(s.system == FIVEL_SYSTEM and len(s.items) == 2 for s in suites)
    assert fivel_suites(PAIRS, POOL, size=0) == []


def test_score_suite_applies_each_kinds_scorer():
    from tasks.evaluate import score_suite

    faith, filt, refusal = fivel_suites(PAIRS[:3], POOL, size=3, k=1, seed=0)
    subs = [it.answer for it in faith.items]
    assert score_suite(faith, subs) == {"faith": [1.0, 1.0, 1.0]}
    assert score_suite(faith, [it.original for it in faith.items]) == {"faith": [0.0, 0.0, 0.0]}
    assert score_suite(filt, ["2.4 kg", "I don't know", "Tromsø"]) == {"filter": [1.0, 0.0, 1.0]}
    assert score_suite(refusal, ["I don't know.", "Ada Lin", "Not mentioned in the passages."]) == {
        "rr": [1.0, 0.0, 1.0]
    }
