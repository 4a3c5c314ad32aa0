"""Facts and held-out splits: what the adapter is trained on never leaks into what it is judged on.

Every QA pair carries a ``fact_id``: the fact it asks about, keyed by its document and its answer's
value (the numbers of a numeric answer, so "2.4 kg" and "2.4 kilograms" are one fact; the normalised
answer otherwise).  Splits are decided per fact, by a hash of the fact id:

* ``eval`` facts (``unseen_frac``): every wording is eval and no pair of the fact is trained: the
  ``unseen`` suite, answerable only if the adapter learned the document itself;
* ``train`` facts: trained, except that one wording per fact may be held out as a ``paraphrase``
  eval question when it is far from every other wording of that fact (content-word Jaccard
  ≤ ``MAX_JACCARD`` **and** MiniLM cosine ≤ ``MAX_COSINE`` to each trained one; a new wording close
  to the held-out one is dropped as its duplicate, never trained; the fact keeps at least
  ``MIN_TRAINED_WORDINGS`` trained wordings),
  and, for a ``dev_frac`` share of the other train facts (by hash), one wording is held out as
  ``dev``: the checkpoint choice and bank selection score recall of a trained fact in words it was
  not trained on.  A fact with a paraphrase question never gets a dev wording and the other way
  round, so dev never shares a fact with eval.

Dev facts used to be whole facts never trained: closed-book recall of those is 0 at every
checkpoint (nothing to choose by) and a tenth of every document's facts went untaught.  Pairs stored
as ``dev`` that way stay ``dev``.

The thresholds are fixed here on purpose: loosening them would turn "held out" into "reworded by a
word".  The evaluation re-checks them against every pair actually trained
(``tasks.stages.evaluate.held_out_suites``), so a later refresh that trains a close wording of an
eval question drops that question from the suite.  Every distance is taken with the document's
subject said as "it" on both sides (:func:`without_subject`): the local generator names the subject
in every wording that names nothing of its own, and a shared name is no closeness of wording.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import numpy as np

from tasks.text import content_words, stable_hash

MAX_JACCARD = 0.5  # content-word Jaccard of a paraphrase to each trained wording of its fact
MAX_COSINE = 0.85  # MiniLM cosine of a paraphrase's question to each trained wording's question
#: Trained wordings a fact keeps when one is held out as a paraphrase question: a fact taught in one
#: wording is rarely recalled in another (the held-out one would measure the hold-out, not the recipe).
MIN_TRAINED_WORDINGS = 2


def _unit(*parts: object) -> float:
    return int(stable_hash(*parts, length=12), 16) / 16**12


def fact_split(fact_id: str, unseen_frac: float = 0.2) -> str:
    """'eval' (unseen) | 'train' for every new pair of a fact, deterministic in its id (a train fact's
    wordings may later be held out as paraphrase or dev questions: :func:`choose_dev`)."""
    return "eval" if _unit("fact-split", fact_id) < unseen_frac else "train"


#: Share of the train facts (by hash) with one wording held out as ``dev``.
DEV_FRAC = 0.25


def choose_dev(
    facts: dict[str, list[int]],
    questions: Sequence[str],
    emb: np.ndarray,
    *,
    skip: Collection[str] = (),
    frac: float = DEV_FRAC,
) -> list[int]:
    """Rows to hold out as ``dev``: for the ``frac`` share of facts (by hash, not in ``skip``: facts
    with a paraphrase or an unseen eval question) that keep at least one trained wording, the
    wording least like the fact's other new wordings (lowest maximum cosine; ties by hash) among
    those that say what they ask (:func:`says_what`; ``questions`` with the subject taken out)."""
    chosen: list[int] = []
    for fact, rows in sorted(facts.items()):
        if fact in skip or len(rows) < 2 or _unit("dev-fact", fact) >= frac:
            continue
        speaking = [r for r in rows if says_what(questions[r])]  # "What is it?" is least like all
        if not speaking:
            continue

        def closeness(r: int, rows: list[int] = rows) -> tuple[float, str]:
            rest = [i for i in rows if i != r]
            return float(np.max(emb[rest] @ emb[r])), stable_hash("dev", questions[r])

        chosen.append(min(speaking, key=closeness))
    return chosen


def _subject_words(subject: str | Collection[str | None] | None) -> list[str]:
    """The name words of one subject or several (a document's versions may be titled differently):
    the capitalised words and numbers, "the" and the joining "of" / "and" left out."""
    subjects = [subject] if isinstance(subject, str) else [x for x in subject or () if x]
    words = {w.rstrip(".:,") for x in subjects for w in x.split()}
    return sorted((w for w in words if w[:1].isupper() or w[:1].isdigit()), key=lambda w: (-len(w), w))


def without_subject(question: str, subject: str | Collection[str | None] | None) -> str:
    """The question with its document's subject (``tasks.chunking.document_subject``; or the subjects
    of all its versions) said as "it", for the distance between wordings: every wording of a fact
    names the same subject, so it says nothing of how far two wordings are. Any run of the subject's
    name words, in any case and any order, is one mention ("the Quillfeather Q7", "the Q7", "the
    Sandrel garden", "Lumenvale Orbit" without its "5.2"), so a shortened name on one side and the
    full one on the other come out the same: "How long are closed tickets kept in Lumenvale Orbit
    5.2?" -> "How long are closed tickets kept in it?", "Who is the Brindlemoor Water Board's chief
    executive?" -> "Who is its chief executive?". Unchanged when there is no subject or none of
    its words is there."""
    words = _subject_words(subject)
    if not words:
        return question
    word = "(?:" + "|".join(re.escape(w) for w in words) + ")"
    run = rf"(?<![\w.-])(?:the\s+)?{word}(?:(?:\s+(?:of|and|&))?\s+{word})*(?P<poss>['’]s|['’](?=\s))?(?![\w-]|\.\d)"

    def say_it(m: re.Match) -> str:
        return "its" if m.group("poss") else "it"

    return re.sub(run, say_it, question, flags=re.I)


#: Words that say nothing of what a question asks about ("Can you tell me ...", "What's ...").
_FILLER = frozenset(
    {"tell", "know", "s", "please", "wonder", "many", "much", "number", "known", "called", "named", "name"}
)


def says_what(question: str) -> bool:
    """Whether a wording, its document's subject taken out (:func:`without_subject`), still says what
    it asks about: a content word besides filler. "What is the Marrowby Rail Depot?" -> "What is
    it?" or "How many does it have?" say nothing and are far from every other wording only because
    they are empty, so they are never held out; "How fast is it?" says "fast" and may be."""
    return bool(content_words(question) - _FILLER)


def jaccard(a: str, b: str) -> float:
    wa, wb = content_words(a), content_words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0


def far_apart(
    question: str, others: Sequence[str], emb: np.ndarray | None, other_emb: np.ndarray | None
) -> bool:
    """True when ``question`` is far from every one of ``others`` by both measures (normalised
    embeddings: ``emb`` is ``[d]``, ``other_emb`` ``[n, d]``)."""
    if any(jaccard(question, o) > MAX_JACCARD for o in others):
        return False
    if others and (emb is None or other_emb is None):
        return False  # no embeddings, no proof of distance
    return not len(others) or float(np.max(other_emb @ emb)) <= MAX_COSINE


def first_close(
    questions: Sequence[str], emb: np.ndarray, others: Sequence[str], other_emb: np.ndarray
) -> list[int | None]:
    """For each of ``questions``, the index of the first of ``others`` it is not :func:`far_apart`
    from (None when far from all): one matrix product and each text's content words once, for many
    questions against many others (normalised rows)."""
    if not len(others):
        return [None] * len(questions)
    cos = emb @ other_emb.T
    other_words = [content_words(o) for o in others]
    out: list[int | None] = []
    for i, q in enumerate(questions):
        words = content_words(q)
        out.append(
            next(
                (
                    j
                    for j, w in enumerate(other_words)
                    if cos[i, j] > MAX_COSINE
                    or (len(words & w) / len(words | w) if words | w else 1.0) > MAX_JACCARD
                ),
                None,
            )
        )
    return out


def choose_paraphrases(
    facts: dict[str, list[int]],
    questions: Sequence[str],
    emb: np.ndarray,
    trained: dict[str, tuple[list[str], np.ndarray]] | None = None,
    *,
    drop_close: bool = False,
) -> list[int]:
    """Rows to hold out as paraphrase questions: at most one per fact, far from every other wording
    of the fact (the new ones in ``facts`` and the already-trained ones in ``trained``).  The fact
    keeps at least ``MIN_TRAINED_WORDINGS`` trained wordings.  ``emb`` rows are normalised question embeddings.

    With ``drop_close`` a new wording may be chosen although some other *new* wordings of its fact
    are close to it ("What is the highest payload ...?" beside "What is the maximum payload ...?"):
    those are then never trained (:func:`close_wordings` names them; the caller drops them), so the
    question stays far from everything trained.  Already-trained wordings must all be far, and the
    wording that gives up the fewest others is chosen."""
    trained = trained or {}
    chosen: list[int] = []
    for fact, rows in sorted(facts.items()):
        old_q, old_e = trained.get(fact, ([], np.zeros((0, emb.shape[1] if emb.ndim == 2 else 0))))
        if len(rows) + len(old_q) < MIN_TRAINED_WORDINGS + 1:
            continue
        best: tuple[int, str, int] | None = None  # (wordings given up, hash, row)
        for r in sorted(rows, key=lambda i: stable_hash("paraphrase", questions[i])):
            if not says_what(questions[r]):
                continue  # far only because it says nothing
            rest = [i for i in rows if i != r]
            close = close_wordings(r, rows, questions, emb) if drop_close else []
            rest = [i for i in rest if i not in close]
            if len(rest) + len(old_q) < MIN_TRAINED_WORDINGS:
                continue  # the fact would keep too few trained wordings to be learned
            others = [questions[i] for i in rest] + list(old_q)
            other_e = np.concatenate([emb[rest], old_e]) if len(old_q) else emb[rest]
            if far_apart(questions[r], others, emb[r], other_e):
                key = (len(close), stable_hash("paraphrase", questions[r]), r)
                best = key if best is None or key < best else best
                if not close:
                    break  # nothing given up: no better choice
        if best is not None:
            chosen.append(best[2])
    return chosen


def close_wordings(row: int, rows: Sequence[int], questions: Sequence[str], emb: np.ndarray) -> list[int]:
    """The ``rows`` (other than ``row``) that are not far from ``row``'s question."""
    return [i for i in rows if i != row and not far_apart(questions[row], [questions[i]], emb[row], emb[[i]])]


def normalised_rows(embeddings: np.ndarray) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
