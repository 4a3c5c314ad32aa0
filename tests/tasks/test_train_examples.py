"""What one training run is made of: the four example kinds and self-distillation replay."""

from __future__ import annotations

import pytest

from storage.settings import Settings
from tasks.holdout import (
    DRIFT_FILE,
    REPLAY_FILE,
    drift_prompts,
    general_prompts,
    holdout_sample,
    replay_prompts,
)
from tasks.train import (
    EXAMPLE_KINDS,
    TrainPair,
    build_examples,
    example_counts,
    supporting_sentence,
    train_params,
    training_data_hash,
)

GOLD = "The Quillfeather Q7 weighs 1.8 kg. Its maximum payload is 2.4 kg. It was designed by Anna Berg."
OTHER = [
    "The Tidewell ferry leaves at 06:15.",
    "Lumenvale 4.2 shipped on 3 March.",
    "Harrowgate staff work remotely.",
]


def pairs(n: int = 40) -> list[TrainPair]:
    return [TrainPair(f"q{i}", f"What is the payload number {i}?", "2.4 kg") for i in range(n)]


def build(settings: Settings, ps: list[TrainPair], **kw):
    return build_examples(
        settings,
        ps,
        chunk_of={p.qa_id: "c1" for p in ps},
        chunk_text={"c1": GOLD},
        distractors={p.qa_id: OTHER for p in ps},
        documents=[("c1", GOLD), ("c2", OTHER[0])],
        general=[(f"General prompt {i}?", f"Base answer {i}.") for i in range(10)],
        dev=[("d1", "What does the Q7 weigh?", "1.8 kg")],
        **kw,
    )


def test_every_kind_is_made_in_its_share():
    settings = Settings(mix_open_book=0.5, mix_distractors_only=0.25, mix_general=0.1)
    ps = pairs(80)
    examples = build(settings, ps)
    counts = example_counts(examples)
    assert (
        counts["closed"] == 80
        and counts["document"] == 2
        and counts["general"] == 2 * 8
        and counts["dev"] == 1
    )
    assert 28 <= counts["open_book"] <= 52 and 10 <= counts["distractors"] <= 30  # hash shares of 80
    for e in examples:
        if e.kind == "open_book":
            passages = e.context.split("\n\n")
            assert GOLD in passages and len(passages) == 3 and set(passages) - {GOLD} <= set(OTHER)
            first, quote = e.answer.split("\n")
            assert first == "2.4 kg" and quote == "Its maximum payload is 2.4 kg."
        if e.kind == "distractors":
            assert GOLD not in e.context and e.answer == "2.4 kg" and len(e.context.split("\n\n")) == 3
        if e.kind == "document":
            assert e.text in (GOLD, OTHER[0]) and not e.question
        if e.kind == "general":
            assert e.group == 1 and e.answer.startswith("Base answer")
    # The gold passage is not always first: the model must find it.
    positions = {e.context.split("\n\n").index(GOLD) for e in examples if e.kind == "open_book"}
    assert len(positions) > 1
    # The same inputs give the same examples (the artifact key depends on them).
    assert build(settings, ps) == examples


def test_switched_off_kinds_leave_closed_book_pairs_only_and_the_old_hash():
    off = Settings(mix_open_book=0, mix_distractors_only=0, mix_document_text=False, mix_general=0)
    ps = pairs(10)
    examples = [e for e in build(off, ps) if e.kind != "dev"]
    assert example_counts(examples) == dict.fromkeys(EXAMPLE_KINDS, 0) | {"closed": 10}
    from tasks.train import data_hash

    assert training_data_hash(ps, examples) == data_hash(ps)  # keys of adapters trained before kinds existed
    assert training_data_hash(ps, build(Settings(), ps)) != data_hash(ps)
    # Settings added later are recorded only when they differ from what earlier adapters used.
    assert not {"mix_open_book", "mix_general", "mix_document_text"} & set(train_params(off))
    assert train_params(Settings())["mix_open_book"] == Settings().mix_open_book


def test_general_replay_is_distilled_in_both_formats_and_recorded():
    """With replay_kl (the default) every general prompt is trained on its base answer in the chat
    format, as without it, and also distilled in the plain format; the switch changes the examples'
    hash and is recorded in the params only when on (older adapters were trained without it)."""
    ps = pairs(40)
    on = [e for e in build(Settings(mix_general=0.25), ps) if e.kind == "general"]
    chat, plain = [e for e in on if not e.plain], [e for e in on if e.plain]
    assert (
        len(chat) == len(plain) == 10 and all(e.distill for e in plain) and not any(e.distill for e in chat)
    )
    assert [(e.question, e.answer) for e in plain] == [(e.question, e.answer) for e in chat]
    off_settings = Settings(mix_general=0.25, replay_kl=False)
    off = [e for e in build(off_settings, ps) if e.kind == "general"]
    assert off == chat
    assert training_data_hash(ps, build(off_settings, ps)) != training_data_hash(
        ps, build(Settings(mix_general=0.25), ps)
    )
    assert train_params(Settings())["replay_kl"] is True and "replay_kl" not in train_params(off_settings)


def test_replay_pairs_never_open_book():
    settings = Settings(mix_open_book=1.0, mix_distractors_only=1.0)
    ps = [TrainPair("old", "Old question?", "2.4 kg", group=1)]
    assert example_counts(build(settings, ps))["open_book"] == 0


def test_supporting_sentence_is_the_one_stating_the_answer():
    assert supporting_sentence(GOLD, "Anna Berg") == "It was designed by Anna Berg."
    assert supporting_sentence(GOLD, "24 kg") is None  # "2.4" is not "24"


@pytest.mark.parametrize("size", [40, 120, 400])
def test_replay_prompts_are_disjoint_from_drift_and_holdout(size):
    """Self-distillation replay must not train what drift and the world-knowledge check measure, at
    any size the settings allow."""
    top = Settings.model_fields
    holdout = {p.question for p in holdout_sample(top["holdout_size"].metadata[-1].le)}
    drift = set(drift_prompts(top["drift_size"].metadata[-1].le))
    from tasks.holdout import REPLAY_GUARD
    from tasks.text import normalize_question

    assert top["holdout_size"].metadata[-1].le <= REPLAY_GUARD >= top["drift_size"].metadata[-1].le
    replay = replay_prompts(size)
    assert len(replay) == size == len(set(replay))
    norm = lambda qs: {normalize_question(q) for q in qs}  # noqa: E731 - "X?" and "X" are one question
    assert not norm(replay) & norm(holdout) and not norm(replay) & norm(drift)
    assert not set(general_prompts(REPLAY_FILE)) & set(general_prompts(DRIFT_FILE))
