"""Replay selection: which earlier train pairs are mixed into a new delta's training.

Seed 002's data recipe, applied to our own history: similarity-first (the earlier pairs nearest the
delta's mean embedding, found with one Chroma query rather than a scan of the whole collection),
then diversity-aware (a pair within ``min_distance`` cosine distance of one already kept adds
nothing new and is dropped), up to a budget.  Too much or too redundant extra data hurts, which is
why the budget is filled greedily in similarity order and near-duplicates do not count against it.

Only pairs the caller declares eligible are ever chosen: in the train stage, earlier *train*-split
pairs that are still active and were trained on by an earlier version.  Dev and eval pairs, excluded
or retired pairs never enter, whatever the Chroma metadata says (it can lag behind the registry).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from storage.settings import Settings
from storage.vectors import QA_PAIRS, VectorStore
from tasks.dedup import embedding_text

#: Chroma pre-filter: earlier train pairs still active (the registry check below is the authority).
TRAIN_ACTIVE = {"$and": [{"split": "train"}, {"status": "active"}]}


@dataclass
class ReplayChoice:
    """The replay sample and how it was reached."""

    ids: list[str] = field(default_factory=list)  # chosen qa_ids, most similar first
    similarity: dict[str, float] = field(default_factory=dict)  # cosine to the delta's mean embedding
    dropped_near_duplicates: list[str] = field(default_factory=list)
    candidates_seen: int = 0  # eligible pairs looked at before the budget filled
    queried: int = 0  # nearest neighbours asked of Chroma (the last, widest query)

    def summary(self) -> dict:
        return {
            "chosen": len(self.ids),
            "dropped_near_duplicates": len(self.dropped_near_duplicates),
            "candidates_seen": self.candidates_seen,
            "queried": self.queried,
            "mean_similarity": round(float(np.mean(list(self.similarity.values()))), 4)
            if self.similarity
            else None,
        }


def delta_centroid(store: VectorStore, delta: Sequence) -> np.ndarray:
    """Unit-length mean embedding of the delta's pairs ([d]).

    The index stage already stored each pair's embedding (``embedding_text`` of question + answer);
    pairs not in Chroma (e.g. indexed by an older run) are embedded here the same way.
    """
    ids = [p.qa_id for p in delta]
    found = {r.id: r.embedding for r in store.get(QA_PAIRS, ids=ids, include_embeddings=True)}
    missing = [p for p in delta if found.get(p.qa_id) is None]
    vectors = [found[i] for i in ids if found.get(i) is not None]
    if missing:
        vectors += list(store.embedder.encode([embedding_text(p.question, p.answer) for p in missing]))
    mean = np.mean(np.stack(vectors), axis=0)  # [n, d] -> [d]
    norm = float(np.linalg.norm(mean))
    if norm == 0.0:
        raise ValueError("the delta's embeddings cancel out: no direction to rank replay candidates by")
    return (mean / norm).astype(np.float32)


def select_replay(
    store: VectorStore,
    delta: Sequence,
    eligible: Collection[str],
    budget: int,
    min_distance: float = 0.1,
) -> ReplayChoice:
    """Up to ``budget`` pairs from ``eligible`` (qa_ids): nearest the delta's mean embedding first,
    skipping any within ``min_distance`` cosine distance of a pair already kept.

    The Chroma query starts at a few times the budget and widens only while the eligible pairs it
    returned cannot fill the budget and the collection holds more.
    """
    out = ReplayChoice()
    eligible = set(eligible)
    if budget <= 0 or not eligible or not delta:
        return out
    if not 0.0 <= min_distance < 2.0:
        raise ValueError(f"min_distance must be a cosine distance in [0, 2), got {min_distance}")
    centre = delta_centroid(store, delta)
    total = store.count(QA_PAIRS)
    k = min(total, max(4 * budget, budget + len(delta)))
    while k > 0:
        out = _greedy(store, centre, k, eligible, budget, min_distance)
        exhausted = k >= total or out.candidates_seen >= len(eligible)
        if len(out.ids) >= budget or exhausted:
            break
        k = min(total, k * 2)  # too few eligible or too many near-duplicates nearby: look further out
    return out


def _greedy(
    store: VectorStore, centre: np.ndarray, k: int, eligible: set[str], budget: int, min_distance: float
) -> ReplayChoice:
    """One pass over the ``k`` nearest pairs to ``centre`` ([d]), in similarity order."""
    out = ReplayChoice(queried=k)
    hits = store.query(QA_PAIRS, centre[None, :], k=k, where=TRAIN_ACTIVE)[0]  # [1, d] query
    order = [h for h in hits if h.id in eligible]
    if not order:
        return out
    # Candidate embeddings for the pairwise distances (the query returned only distances to the centre).
    emb = {r.id: r.embedding for r in store.get(QA_PAIRS, ids=[h.id for h in order], include_embeddings=True)}
    kept: list[np.ndarray] = []  # unit vectors [d] of the pairs kept so far
    for hit in order:
        if len(out.ids) >= budget:
            break
        vector = emb.get(hit.id)
        if vector is None:
            continue
        out.candidates_seen += 1
        if kept:
            closest = float(np.max(np.stack(kept) @ vector))  # [n_kept, d] @ [d] -> cosine similarities
            if 1.0 - closest < min_distance:
                out.dropped_near_duplicates.append(hit.id)
                continue
        kept.append(vector)
        out.ids.append(hit.id)
        out.similarity[hit.id] = round(hit.similarity, 6)
    return out


def replay_for_delta(settings: Settings, delta: Sequence, earlier: Sequence) -> tuple[list, ReplayChoice]:
    """The train stage's replay: ``earlier`` (active train pairs trained on by earlier versions) ranked
    and thinned by :func:`select_replay` against the delta; returns (chosen pairs, how)."""
    if settings.replay_budget <= 0 or not earlier:
        return [], ReplayChoice()
    by_id = {p.qa_id: p for p in earlier if p.split == "train"}
    choice = select_replay(
        VectorStore(settings), delta, by_id, settings.replay_budget, settings.replay_min_distance
    )
    return [by_id[i] for i in choice.ids], choice
