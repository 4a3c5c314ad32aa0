"""Held-out that is really held out: splits per fact, paraphrases far from every trained wording,
unseen facts with no trained pair, re-checked at evaluation time (real registry, Chroma, MiniLM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.records import QAPair, fact_id_for
from storage.registry import Registry
from tasks.splits import (
    MAX_COSINE,
    MAX_JACCARD,
    MIN_TRAINED_WORDINGS,
    choose_dev,
    choose_paraphrases,
    close_wordings,
    fact_split,
    far_apart,
    first_close,
    jaccard,
    normalised_rows,
    says_what,
    without_subject,
)

FAR = "How many kilograms can the Brisken drone lift at most?"
CLOSE = (
    "What is the maximum payload of the Quillfeather Q7?",
    "What is the Quillfeather Q7's maximum payload?",
)


def test_thresholds_are_the_fixed_ones():
    assert (MAX_JACCARD, MAX_COSINE) == (0.5, 0.85)


def test_splits_are_per_fact_and_proportional():
    facts = [fact_id_for("doc", f"{i} kg") for i in range(4000)]
    splits = [fact_split(f) for f in facts]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "dev", "eval")}
    # no whole fact is dev any more (a dev fact's closed-book recall is 0 at every checkpoint)
    assert abs(frac["eval"] - 0.2) < 0.03 and frac["dev"] == 0
    # every wording of one fact lands in one split
    assert {fact_split(fact_id_for("doc", a)) for a in ("2.4 kg", "2.4 kilograms", "about 2.4")} == {
        fact_split(fact_id_for("doc", "2.4 kg"))
    }


def test_without_subject_leaves_out_what_every_wording_names():
    lumen, board = "Lumenvale Orbit 5.2", "the Brindlemoor Water Board"
    assert without_subject("How long are closed tickets kept in Lumenvale Orbit 5.2?", lumen) == (
        "How long are closed tickets kept in it?"
    )
    assert without_subject("Who is the Brindlemoor Water Board's chief executive?", board) == (
        "Who is its chief executive?"
    )
    garden = "the Sandrel Botanic Garden"
    assert without_subject("When is the Sandrel Botanic Garden open?", garden) == "When is it open?"
    # A shortened name is the same mention as the full one: both sides come out alike.
    q7 = "the Quillfeather Q7"
    assert without_subject("How heavy is the Q7?", q7) == without_subject(
        "How heavy is the Quillfeather Q7?", q7
    )
    assert without_subject("When does the Sandrel garden open?", garden) == "When does it open?"
    assert without_subject("What is new in Lumenvale Orbit?", lumen) == "What is new in it?"
    # Joining words inside a name; the subjects of several versions; a number that only starts the same
    tin = "the Museum of Tin and Salt"
    assert without_subject("Where is the Museum of Tin and Salt?", tin) == "Where is it?"
    assert without_subject("How heavy is the Q7?", [None, "the Quillfeather Q8", q7]) == "How heavy is it?"
    assert without_subject("What changed in version 5.2.1?", lumen) == "What changed in version 5.2.1?"
    # no subject, or none of its words: unchanged
    assert without_subject("How tall is it?", None) == "How tall is it?"
    assert without_subject("Who chairs the board?", "the Quillfeather Q7") == "Who chairs the board?"
    # Two wordings that share only the subject are far once it is left out, close with it.
    a = "What is the default retention period for closed tickets in Lumenvale Orbit 5.2?"
    b = "How long are closed tickets kept in Lumenvale Orbit 5.2?"
    assert jaccard(a, b) > jaccard(without_subject(a, lumen), without_subject(b, lumen))


def test_far_apart_needs_both_measures(embedder):
    qs = [FAR, *CLOSE]
    emb = normalised_rows(embedder.encode(qs))
    assert jaccard(CLOSE[0], CLOSE[1]) > MAX_JACCARD
    assert not far_apart(CLOSE[0], [CLOSE[1]], emb[1], emb[2:3])
    assert far_apart(FAR, list(CLOSE), emb[0], emb[1:])
    # lexically far but the same sentence in meaning by embedding: refused by the cosine
    assert not far_apart(
        "Q7 payload maximum?",
        ["Maximum payload, Q7?"],
        *normalised_rows(embedder.encode(["Q7 payload maximum?", "Maximum payload, Q7?"]))[[0]],
        normalised_rows(embedder.encode(["Maximum payload, Q7?"])),
    )


def test_choose_paraphrases_holds_out_one_far_wording_and_keeps_two_trained(embedder):
    qs = [FAR, *CLOSE, "When did the Quillfeather Q7 launch?"]
    emb = normalised_rows(embedder.encode(qs))
    chosen = choose_paraphrases({"payload": [0, 1, 2], "launch": [3]}, qs, emb)
    assert chosen == [0]  # the far one; a single wording is never held out
    assert choose_paraphrases({"payload": [1, 2]}, qs, emb) == []  # close wordings stay in train
    # a fact keeps two trained wordings: with one other wording, nothing is held out
    assert MIN_TRAINED_WORDINGS == 2 and choose_paraphrases({"payload": [0, 1]}, qs, emb) == []
    # against already-trained wordings: the far one is held out even when it is the only new one
    trained = {"payload": (list(CLOSE), emb[1:3])}
    assert choose_paraphrases({"payload": [0]}, qs, emb, trained) == [0]
    assert choose_paraphrases({"payload": [1]}, qs, emb, {"payload": ([CLOSE[1]], emb[2:3])}) == []


def test_choose_paraphrases_drop_close_gives_up_new_wordings_close_to_the_held_out_one(embedder):
    sibling = "How many kilograms can the Brisken drone lift at the most?"  # FAR said almost the same
    qs = [FAR, sibling, *CLOSE]
    emb = normalised_rows(embedder.encode(qs))
    facts = {"payload": [0, 1, 2, 3]}
    assert choose_paraphrases(facts, qs, emb) == []  # each far candidate has a close sibling
    chosen = choose_paraphrases(facts, qs, emb, drop_close=True)
    assert len(chosen) == 1  # two pairs of close wordings: one of either pair may be held out
    (r,) = chosen
    sibling_of = {0: 1, 1: 0, 2: 3, 3: 2}
    assert close_wordings(r, facts["payload"], qs, emb) == [sibling_of[r]]  # only its sibling goes
    kept = [i for i in facts["payload"] if i not in (r, sibling_of[r])]
    assert far_apart(qs[r], [qs[i] for i in kept], emb[r], emb[kept])  # far from all that is trained
    # a fact whose other wordings are all close keeps them: nothing is held out
    assert choose_paraphrases({"payload": [0, 1]}, qs, emb, drop_close=True) == []
    # already-trained wordings are never given up: a close trained one blocks the hold-out
    trained = {"payload": ([sibling], emb[1:2])}
    assert choose_paraphrases({"payload": [0]}, qs, emb, trained, drop_close=True) == []


def test_a_wording_that_says_nothing_once_its_subject_is_out_is_never_held_out(embedder):
    subject = "the Marrowby Rail Depot"
    vague = without_subject("What is the Marrowby Rail Depot?", subject)
    assert vague == "What is it?" and not says_what(vague)
    assert not says_what(without_subject("Can you tell me what the Marrowby Rail Depot is?", subject))
    assert says_what(without_subject("How fast is the Marrowby Rail Depot?", subject))  # "fast"
    assert not says_what(without_subject("How many does the Marrowby Rail Depot have?", subject))
    qs = [vague, *(without_subject(q, subject) for q in (
        "How many trains can the Marrowby Rail Depot service?",
        "What number of trains does the Marrowby Rail Depot service?",
    ))]  # fmt: skip
    emb = normalised_rows(embedder.encode(qs))
    # "What is it?" is far from both others by both measures, yet it is not a paraphrase question
    assert far_apart(qs[0], qs[1:], emb[0], emb[1:])
    assert choose_paraphrases({"trains": [0, 1, 2]}, qs, emb) == []


def test_choose_dev_never_picks_a_wording_that_says_nothing(embedder):
    qs = ["What is it?", "How many trains does it service?", "What number of trains does it service?"]
    emb = normalised_rows(embedder.encode(qs))
    facts = {f"fact-{i}": [0, 1, 2] for i in range(40)}  # one set of wordings under many fact ids
    chosen = choose_dev(facts, qs, emb)
    assert chosen and 0 not in chosen  # the emptiest wording is least like the rest, yet never dev


def test_choose_dev_holds_out_one_wording_of_a_share_of_facts_that_keep_one(embedder):
    facts = {f"fact-{i}": [3 * i, 3 * i + 1, 3 * i + 2] for i in range(200)}
    qs = [f"Question {j} about the item {j // 3}?" for j in range(600)]
    emb = normalised_rows(embedder.encode(qs))
    chosen = choose_dev(facts, qs, emb)
    owners = [j // 3 for j in chosen]
    assert len(owners) == len(set(owners))  # at most one wording per fact
    assert 0.15 < len(chosen) / len(facts) < 0.35  # about DEV_FRAC of the facts
    assert chosen == choose_dev(facts, qs, emb)  # deterministic
    # facts with a paraphrase (or unseen) question and facts left with fewer than two wordings: none
    skip = {f"fact-{o}" for o in owners}
    assert choose_dev(facts, qs, emb, skip=skip) == []
    assert choose_dev({"f": [0]}, qs, emb, frac=1.0) == []
    assert len(choose_dev({"f": [0, 1]}, qs, emb, frac=1.0)) == 1  # one wording stays trained
    # the wording least like the others is the one held out
    three = ["What is the maximum payload of the Q7?", "What is the Q7's maximum payload?", FAR]
    e3 = normalised_rows(embedder.encode(three))
    assert choose_dev({"p": [0, 1, 2]}, three, e3, frac=1.0) == [2]


def test_index_stage_holds_out_far_wordings_and_evaluation_rechecks(
    settings, embedder, tmp_path: Path, monkeypatch
):
    from tasks.stages.evaluate import held_out_suites
    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage

    s = settings.model_copy(update={"fivel_size": 0})
    reg = Registry.from_settings(s)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "q7.md").write_text(
        "The Quillfeather Q7 drone is built by Brisken. The Quillfeather Q7 carries a maximum payload of "
        "2.4 kg. The Quillfeather Q7 flies for 47 minutes.\n"
    )
    ingest_stage(s, folder, "run-1")
    chunk = reg.chunks()[0]
    new = lambda q, a, split: QAPair.new(chunk.chunk_id, chunk.doc_id, q, a, split)  # noqa: E731
    train = [new(q, "2.4 kg", "train") for q in (FAR, *CLOSE)]
    near_eval = new(
        "What's the maximum payload of the Quillfeather Q7 drone?", "2.4 kg", "eval"
    )  # an old home's split
    unseen = new("For how long can the Quillfeather Q7 stay in the air?", "47 minutes", "eval")
    more_unseen = [  # more wordings of the same untrained fact: at most HELD_OUT_PER_FACT are scored
        new(q, "47 minutes", "eval")
        for q in (
            "What is the flight time of the Quillfeather Q7 drone?",
            "How many minutes does the Q7 fly?",
        )
    ]
    leak = new("Who builds the Quillfeather Q7 drone?", "Brisken", "eval")  # its fact is trained below
    leak_train = new("Which company makes the Quillfeather Q7?", "Brisken", "train")
    reg.add_qa_pairs([*train, near_eval, unseen, *more_unseen, leak, leak_train], run_id="run-1")
    summary = index_stage(s, "run-1")
    assert summary.qa_held_out == 1
    by_q = {p.question: p for p in reg.qa_pairs()}
    assert by_q[FAR].split == "eval" and {by_q[q].split for q in CLOSE} == {"train"}
    trained = [p for p in reg.qa_pairs(split="train")]
    version = reg.create_version(
        run_id="run-1", artifact_uri=str(tmp_path / "a1"), artifact_sha256="sha",
        trained_pairs={p.qa_id: "delta" for p in trained},
    )  # fmt: skip
    suites = {k: {p.question for p in v} for k, v in held_out_suites(s, reg, version).items()}
    # The close eval wording of a trained fact is never scored; a far one of a trained fact is a
    # paraphrase, never "unseen".
    assert suites["paraphrase"] == {FAR, leak.question}
    from tasks.stages.evaluate import HELD_OUT_PER_FACT

    wordings = {unseen.question, *(p.question for p in more_unseen)}
    assert len(suites["unseen"]) == HELD_OUT_PER_FACT == 2 and suites["unseen"] <= wordings
    # the two kept are the first by id (deterministic); with the cap raised all three are scored
    assert suites["unseen"] == {p.question for p in sorted([unseen, *more_unseen], key=lambda p: p.qa_id)[:2]}
    import tasks.stages.evaluate as stage

    monkeypatch.setattr(stage, "HELD_OUT_PER_FACT", 3)
    assert {p.question for p in held_out_suites(s, reg, version)["unseen"]} == wordings
    # the cap is per fact in both suites (an unseen fact's wordings that agree with a trained
    # answer all land in "paraphrase": they count as one fact's questions, not as many)
    monkeypatch.setattr(stage, "HELD_OUT_PER_FACT", 0)
    assert held_out_suites(s, reg, version) == {"paraphrase": [], "unseen": []}
    # Chroma agrees with the registry on the held-out split and carries the fact ids.
    from storage.vectors import QA_PAIRS, VectorStore

    meta = {r.id: r.metadata for r in VectorStore(s).get(QA_PAIRS, ids=[by_q[FAR].qa_id, unseen.qa_id])}
    assert meta[by_q[FAR].qa_id]["split"] == "eval" and meta[unseen.qa_id]["fact_id"] == unseen.fact_id
    # A pair some version trained on is never moved to eval, nor to dev; no other split is a hold-out.
    assert reg.hold_out([by_q[CLOSE[0]].qa_id], "eval") == 0
    assert reg.hold_out([by_q[CLOSE[0]].qa_id], "dev") == 0
    with pytest.raises(ValueError, match="'eval' or 'dev'"):
        reg.hold_out([by_q[CLOSE[0]].qa_id], "train")


def test_normalised_rows():
    e = normalised_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(e[0], [0.6, 0.8]) and np.allclose(e[1], [0.0, 0.0])


def test_a_close_question_under_another_fact_or_an_edited_document_is_never_scored(
    settings, embedder, tmp_path
):
    """Fact ids differ when the answer is written differently ("2.4 kg (5.3 lb)") or when the document
    was edited (a new doc id): the evaluation compares every eval question with every trained question
    of its document, under any of its versions, and drops the close ones."""
    from tasks.stages.evaluate import held_out_suites
    from tasks.stages.ingest import ingest_stage

    reg = Registry.from_settings(settings)
    folder = tmp_path / "docs"
    folder.mkdir()
    doc = folder / "q7.md"
    doc.write_text(
        "The Quillfeather Q7 carries a maximum payload of 2.4 kg (5.3 lb). It flies for 47 minutes.\n"
    )
    ingest_stage(settings, folder, "run-1")
    c1 = reg.chunks()[0]
    trained = QAPair.new(c1.chunk_id, c1.doc_id, CLOSE[0], "2.4 kg (5.3 lb)", "train")
    close_other_fact = QAPair.new(c1.chunk_id, c1.doc_id, CLOSE[1], "2.4 kg", "eval")
    reg.add_qa_pairs([trained, close_other_fact])
    assert trained.fact_id != close_other_fact.fact_id
    v1 = reg.create_version(run_id="run-1", artifact_uri=str(tmp_path / "a1"), artifact_sha256="s1",
                            trained_pairs={trained.qa_id: "delta"})  # fmt: skip
    assert held_out_suites(settings, reg, v1) == {"paraphrase": [], "unseen": []}
    # The document is edited: a new doc id, new fact ids; the trained question of its first version
    # still counts.
    doc.write_text("The Quillfeather Q7 carries a maximum payload of 2.6 kg. It flies for 47 minutes.\n")
    ingest_stage(settings, folder, "run-2")
    c2 = next(c for c in reg.chunks() if "2.6" in c.text)
    reworded = QAPair.new(
        c2.chunk_id, c2.doc_id, "What is the Quillfeather Q7's maximum payload now?", "2.6 kg", "eval"
    )
    far = QAPair.new(
        c2.chunk_id, c2.doc_id, "For how long can the drone stay airborne?", "47 minutes", "eval"
    )
    helper = QAPair.new(c2.chunk_id, c2.doc_id, "What does the Q7 do?", "flies", "train")
    reg.add_qa_pairs([reworded, far, helper])
    v2 = reg.create_version(run_id="run-2", artifact_uri=str(tmp_path / "a2"), artifact_sha256="s2",
                            trained_pairs={helper.qa_id: "delta"})  # fmt: skip
    got = {k: [p.question for p in v] for k, v in held_out_suites(settings, reg, v2).items()}
    assert got == {"paraphrase": [], "unseen": [far.question]}


def test_first_close_agrees_with_far_apart(embedder):
    qs = [FAR, *CLOSE, "When did the Quillfeather Q7 launch?"]
    emb = normalised_rows(embedder.encode(qs))
    hits = first_close(qs, emb, list(CLOSE), emb[1:3])
    for i, q in enumerate(qs):
        close = [j for j in range(2) if not far_apart(q, [CLOSE[j]], emb[i], emb[1 + j : 2 + j])]
        assert hits[i] == (close[0] if close else None)
    assert hits[0] is None and hits[1] == 0  # the far one, and a question close to itself
    assert first_close(qs, emb, [], emb[:0]) == [None] * len(qs)


def test_the_evaluation_says_every_version_s_subject_as_it(settings, embedder, tmp_path: Path):
    """An edited document is a new version (its old chunks retired): a trained wording of the old
    version and the same wording filed as eval under the new one are one question, whatever the
    subject stripping does to each, so the new one is never scored as held out."""
    from tasks.chunking import document_subjects
    from tasks.stages.evaluate import held_out_suites
    from tasks.stages.ingest import ingest_stage

    s = settings.model_copy(update={"fivel_size": 0})
    reg = Registry.from_settings(s)
    folder = tmp_path / "docs"
    folder.mkdir()
    page = folder / "garden.md"
    body = "# Sandrel Botanic Garden: Visitor Notes\n\nThe Sandrel Botanic Garden opens at {} on Sundays.\n"
    page.write_text(body.format("09:30"))
    ingest_stage(s, folder, "run-1")
    (old,) = reg.chunks()
    question = "When does the Sandrel Botanic Garden open on Sundays?"
    trained = QAPair.new(old.chunk_id, old.doc_id, question, "09:30", "train")
    reg.add_qa_pairs([trained], run_id="run-1")
    version = reg.create_version(
        run_id="run-1", artifact_uri=str(tmp_path / "a1"), artifact_sha256="sha",
        trained_pairs={trained.qa_id: "delta"},
    )  # fmt: skip
    page.write_text(body.format("10:00"))
    ingest_stage(s, folder, "run-2")
    (new,) = reg.chunks()
    assert new.doc_id != old.doc_id and document_subjects(reg, [old.doc_id]) == {}  # retired
    again = QAPair.new(new.chunk_id, new.doc_id, question, "10:00", "eval")
    reg.add_qa_pairs([again], run_id="run-2")
    suites = held_out_suites(s, reg, version, {new.doc_id})
    assert suites == {"paraphrase": [], "unseen": []}
