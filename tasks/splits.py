"""Facts and held-out splits: what the adapter is trained on never leaks into what it is judged on.

Every QA pair carries a ``fact_id``: the fact it asks about, keyed by its document and its answer's
value (the numbers of a numeric answer, so "2.4 kg" and "2.4 kilograms" are one fact; the normalised
answer otherwise).  Splits are decided per fact, by a hash of the fact id:

* ``dev`` facts (``dev_frac``): every wording is dev (bank selection, checkpoint choice), so dev never
  shares a fact with eval;
* ``eval`` facts (``unseen_frac``): every wording is eval and no pair of the fact is trained: the
  ``unseen`` suite, answerable only if the adapter learned the document itself;
* ``train`` facts: trained, except that one wording per fact may be held out as a ``paraphrase``
  eval question when it is far from every other wording of that fact (content-word Jaccard
  ≤ ``MAX_JACCARD`` **and** MiniLM cosine ≤ ``MAX_COSINE`` to each); a closer wording stays in train.

The thresholds are fixed here on purpose: loosening them would turn "held out" into "reworded by a
word".  The evaluation re-checks them against every pair actually trained (``paraphrase_ok``), so a
later refresh that trains a close wording of an eval question drops that question from the suite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.text import content_words, stable_hash

MAX_JACCARD = 0.5  # content-word Jaccard of a paraphrase to each trained wording of its fact
MAX_COSINE = 0.85  # MiniLM cosine of a paraphrase's question to each trained wording's question


def _unit(*parts: object) -> float:
    return int(stable_hash(*parts, length=12), 16) / 16**12


def fact_split(fact_id: str, dev_frac: float = 0.1, unseen_frac: float = 0.2) -> str:
    """'eval' (unseen) | 'dev' | 'train' for every pair of a fact, deterministic in its id."""
    u = _unit("fact-split", fact_id)
    if u < unseen_frac:
        return "eval"
    if u < unseen_frac + dev_frac:
        return "dev"
    return "train"


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


def choose_paraphrases(
    facts: dict[str, list[int]],
    questions: Sequence[str],
    emb: np.ndarray,
    trained: dict[str, tuple[list[str], np.ndarray]] | None = None,
) -> list[int]:
    """Rows to hold out as paraphrase questions: at most one per fact, far from every other wording
    of the fact (the new ones in ``facts`` and the already-trained ones in ``trained``).  The fact
    keeps at least one trained wording.  ``emb`` rows are normalised question embeddings."""
    trained = trained or {}
    chosen: list[int] = []
    for fact, rows in sorted(facts.items()):
        old_q, old_e = trained.get(fact, ([], np.zeros((0, emb.shape[1] if emb.ndim == 2 else 0))))
        if len(rows) + len(old_q) < 2:
            continue
        for r in sorted(rows, key=lambda i: stable_hash("paraphrase", questions[i])):
            rest = [i for i in rows if i != r]
            others = [questions[i] for i in rest] + list(old_q)
            other_e = np.concatenate([emb[rest], old_e]) if len(old_q) else emb[rest]
            if far_apart(questions[r], others, emb[r], other_e):
                chosen.append(r)
                break
    return chosen


def normalised_rows(embeddings: np.ndarray) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
