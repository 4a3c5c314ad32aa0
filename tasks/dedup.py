"""Dedup stage: exact and semantic duplicates among new QA pairs and against the indexed ones.

- exact: same normalised question AND normalised answer (the chunk does not matter);
- semantic: cosine of the (question + answer) embeddings at or above a threshold, AND answers that
  agree. Embeddings barely see numbers ("payload 2.4 kg" vs "payload 3.1 kg" score ~0.97), so two
  pairs asking the same thing with different answers are both kept: that is a conflict for a human,
  not a duplicate. Two wordings of one fact (same chunk or same ``fact_id``) are variants, never
  semantic duplicates: each wording teaches the fact in other words.

Within a cluster the best pair wins: best grounded in its chunk, then the shorter question, then the
smaller qa_id (deterministic). Against the index, the indexed pair always wins (it was there first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from tasks.text import contains_span, normalize_answer, numbers, qa_key, token_f1

QA_COLLECTION = "qa_pairs"  # storage.vectors.QA_PAIRS
_IN_BATCH = 500  # ids / keys per Chroma filter
_NEIGHBOURS = 4  # nearest indexed pairs looked at per new pair (room for itself and variants)


class _PairLike(Protocol):
    qa_id: str
    chunk_id: str
    question: str
    answer: str


class Duplicate(NamedTuple):
    qa_id: str
    duplicate_of: str
    kind: str  # 'exact' | 'semantic'
    similarity: float


@dataclass
class DedupResult:
    kept: list[Any] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    kept_indices: list[int] = field(default_factory=list)  # rows of the input (and of `embeddings`)


def embedding_text(question: str, answer: str) -> str:
    """What a QA pair's embedding is computed from (dedup and index must agree)."""
    return f"{question} {answer}"


def answers_agree(a: str, b: str) -> bool:
    """Same answer up to wording: equal numbers, and equal, contained or token-F1 >= 0.5."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if na == nb:
        return True
    if sorted(numbers(na)) != sorted(numbers(nb)):
        return False
    return contains_span(na, nb) or contains_span(nb, na) or token_f1(na, nb) >= 0.5


def grounding(answer: str, chunk_text: str | None) -> float:
    """How well the answer is anchored in its chunk: share of its tokens there, +1 if contiguous."""
    if not chunk_text:
        return 0.0
    a, c = normalize_answer(answer).split(), normalize_answer(chunk_text)
    if not a:
        return 0.0
    c_tokens = set(c.split())
    return sum(t in c_tokens for t in a) / len(a) + float(f" {' '.join(a)} " in f" {c} ")


def _variant(a: _PairLike, b: _PairLike) -> bool:
    """Two wordings of one fact (same chunk, or same ``fact_id`` from overlapping chunks): distinct
    wordings teach the fact to be recalled in words never trained, so neither is a duplicate (exact
    copies were caught before, by key)."""
    fa, fb = getattr(a, "fact_id", None), getattr(b, "fact_id", None)
    return a.chunk_id == b.chunk_id or (fa is not None and fa == fb)


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norms, 1e-12)


def _against_index(
    pairs: Sequence[_PairLike],
    keys: list[str],
    emb: np.ndarray,
    rows: list[int],
    store: Any,
    collection: str,
    threshold: float,
) -> list[Duplicate | None]:
    """For each row: the indexed active pair it duplicates (exact first, then nearest neighbour)."""
    out: list[Duplicate | None] = [None] * len(rows)
    if not rows or store.count(collection) == 0:
        return out
    own = {pairs[i].qa_id for i in rows}
    by_key: dict[str, str] = {}
    wanted = sorted({keys[i] for i in rows})
    for start in range(0, len(wanted), _IN_BATCH):
        where = {"$and": [{"qa_key": {"$in": wanted[start : start + _IN_BATCH]}}, {"status": "active"}]}
        for rec in store.get(collection, where=where):
            if rec.id not in own:
                key = rec.metadata.get("qa_key")
                by_key[key] = min(by_key.get(key, rec.id), rec.id)
    need: list[int] = []
    for j, i in enumerate(rows):
        if keys[i] in by_key:
            out[j] = Duplicate(pairs[i].qa_id, by_key[keys[i]], "exact", 1.0)
        else:
            need.append(j)
    if need:
        _nearest_active(pairs, emb, rows, need, store, collection, threshold, out)
    return out


def _nearest_active(
    pairs: Sequence[_PairLike],
    emb: np.ndarray,
    rows: list[int],
    need: list[int],
    store: Any,
    collection: str,
    threshold: float,
    out: list[Duplicate | None],
) -> None:
    """Semantic duplicates against the index: one batched top-k query, no metadata filter.

    Chroma evaluates a ``where`` filter for every query (20,000 queries on 20,000 records: ~120 s with
    ``status = active``, ~20 s without), and retired records are rare, so they are skipped here in
    Python. Only a row whose k hits are all close enough but all unusable (itself, a variant from
    its own chunk, retired) is asked again with the filter.
    """
    k = _NEIGHBOURS

    def usable(pair: _PairLike, row_hits: list[Any]) -> list[Any]:
        # A different wording from the same chunk or of the same fact is a deliberate variant (the
        # held-out twin of a trained question, another wording to learn), not a duplicate: exact
        # copies were caught before.
        return [
            h
            for h in row_hits
            if h.id != pair.qa_id
            and h.metadata.get("chunk_id") != pair.chunk_id
            and (getattr(pair, "fact_id", None) is None or h.metadata.get("fact_id") != pair.fact_id)
            and h.metadata.get("status", "active") == "active"
        ]

    def decide(j: int, pair: _PairLike, hit: Any | None) -> None:
        if hit is None or hit.similarity < threshold:
            return
        other = hit.metadata.get("answer")
        if other is None or answers_agree(pair.answer, str(other)):
            out[j] = Duplicate(pair.qa_id, hit.id, "semantic", float(hit.similarity))

    again: list[int] = []
    hits = store.query(collection, emb[[rows[j] for j in need]], k=k)  # (len(need), <=k) hits
    for j, row_hits in zip(need, hits, strict=True):
        pair = pairs[rows[j]]
        good = usable(pair, row_hits)
        if not good and len(row_hits) == k and row_hits[-1].similarity >= threshold:
            again.append(j)  # everything this close was unusable: a nearer usable one may hide behind
            continue
        decide(j, pair, good[0] if good else None)
    if again:
        hits = store.query(collection, emb[[rows[j] for j in again]], k=k, where={"status": "active"})
        for j, row_hits in zip(again, hits, strict=True):
            pair = pairs[rows[j]]
            good = usable(pair, row_hits)
            decide(j, pair, good[0] if good else None)


def dedup_pairs(
    pairs: Sequence[_PairLike],
    embeddings: np.ndarray,
    existing: Any | None,
    threshold: float,
    *,
    chunk_texts: Mapping[str, str] | None = None,
    collection: str = QA_COLLECTION,
    block: int = 1024,
) -> DedupResult:
    """Split `pairs` into kept ones and duplicates (of a kept pair or of an indexed one).

    `embeddings[i]` embeds `embedding_text(pairs[i].question, pairs[i].answer)`. `existing` is a
    `storage.vectors.VectorStore` (or None); `chunk_texts` (chunk_id -> text) ranks pairs by grounding.
    Within the batch the comparison is a blocked matrix product in rank order, O(n^2 d) time and
    O(block n) memory; against the index it is one batched nearest-neighbour query.
    """
    n = len(pairs)
    if len(embeddings) != n:
        raise ValueError(f"{len(embeddings)} embeddings for {n} pairs")
    result = DedupResult()
    if n == 0:
        return result
    texts = chunk_texts or {}

    def rank(i: int) -> tuple[float, int, str]:
        p = pairs[i]
        return (-grounding(p.answer, texts.get(getattr(p, "chunk_id", ""))), len(p.question), p.qa_id)

    order = sorted(range(n), key=rank)
    keys = [qa_key(p.question, p.answer) for p in pairs]
    emb = _normalised(embeddings)
    dup: dict[int, Duplicate] = {}

    # 1. exact within the batch: the best-ranked pair of each key stays.
    first: dict[str, int] = {}
    for i in order:
        if keys[i] in first:
            dup[i] = Duplicate(pairs[i].qa_id, pairs[first[keys[i]]].qa_id, "exact", 1.0)
        else:
            first[keys[i]] = i

    # 2. against the index: exact by key, then semantic by nearest neighbour.
    if existing is not None:
        rows = [i for i in order if i not in dup]
        for i, d in zip(
            rows, _against_index(pairs, keys, emb, rows, existing, collection, threshold), strict=True
        ):
            if d is not None:
                dup[i] = d

    # 3. semantic within the batch, greedy in rank order: a pair is dropped when a better-ranked kept
    # pair is at least `threshold` similar and their answers agree.
    rest = [i for i in order if i not in dup]
    e = emb[rest]
    kept = np.zeros(len(rest), dtype=bool)
    for start in range(0, len(rest), block):
        stop = min(start + block, len(rest))
        sims = e[start:stop] @ e[:stop].T  # (block, stop): each row against itself and all better-ranked
        for r in range(stop - start):
            g = start + r
            near = np.nonzero(sims[r, :g] >= threshold)[0]
            near = near[kept[near]]
            for c in near[np.argsort(-sims[r, near], kind="stable")]:
                if _variant(pairs[rest[c]], pairs[rest[g]]):
                    continue  # another wording of the same fact: a variant, kept
                if answers_agree(pairs[rest[g]].answer, pairs[rest[c]].answer):
                    dup[rest[g]] = Duplicate(
                        pairs[rest[g]].qa_id, pairs[rest[c]].qa_id, "semantic", float(sims[r, c])
                    )
                    break
            else:
                kept[g] = True

    result.kept_indices = [i for i in range(n) if i not in dup]
    result.kept = [pairs[i] for i in result.kept_indices]
    position = {i: k for k, i in enumerate(order)}
    result.duplicates = [dup[i] for i in sorted(dup, key=position.__getitem__)]
    return result
