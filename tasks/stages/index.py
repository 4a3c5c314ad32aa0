"""The dedup + index stage: embed new pairs and chunks, drop duplicates, hold out far paraphrases for
evaluation, and index the rest into Chroma.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from storage.registry import Registry
from storage.settings import Settings
from tasks.stages.progress import Progress, say


@dataclass
class IndexSummary:
    chunks_indexed: int = 0
    qa_indexed: int = 0
    qa_duplicates: int = 0
    retired_vectors: int = 0
    restored_vectors: int = 0
    qa_held_out: int = 0  # new train-fact wordings held out as paraphrase eval questions
    qa_dev: int = 0  # new train-fact wordings held out as dev (checkpoint choice)
    qa_rekeyed: int = 0  # indexed pairs re-keyed under the current answer normalisation
    excluded_vectors: int = 0  # indexed pairs flagged excluded as the registry has them
    qa_excluded_near_holdout: int = 0  # new pairs excluded as close to a hand-written held-out question
    superseded_vectors: int = 0  # indexed pairs flagged (or unflagged) superseded as the registry has them


def hold_out_wordings(
    reg: Registry, store, new: Sequence, known: Sequence, run_id: str
) -> tuple[list[int], int, int, int]:
    """Hold out wordings of the new pairs' train facts: one far wording of some facts moved to
    ``eval`` (paraphrase questions; the fact's other new wordings close to it are marked its
    duplicates, never trained) and one wording of a share of the others moved to ``dev``
    (``tasks.splits``), compared with the fact's other new wordings and with its wordings already
    stored as train.  Returns the rows of ``new`` still to index, and how many went to eval, dev and
    duplicate."""
    from tasks.chunking import document_subjects
    from tasks.splits import choose_dev, choose_paraphrases, close_wordings, normalised_rows, without_subject

    facts: dict[str, list[int]] = {}
    for i, p in enumerate(new):
        if p.split == "train":
            facts.setdefault(p.fact_id, []).append(i)
    if not facts:
        return list(range(len(new))), 0, 0, 0
    new_ids = {p.qa_id for p in new}
    old = [p for p in known if p.fact_id in facts and p.split == "train" and p.qa_id not in new_ids]
    # Distances between wordings leave out the document's subject, which every wording names.
    subject = document_subjects(reg, sorted({p.doc_id for p in [*new, *old]}), status=None)

    def bare(p) -> str:
        return without_subject(p.question, subject.get(p.doc_id))

    emb = normalised_rows(store.embedder.encode([bare(p) for p in new] + [bare(p) for p in old]))
    old_rows: dict[str, list[int]] = {}
    for j, p in enumerate(old):
        old_rows.setdefault(p.fact_id, []).append(len(new) + j)
    trained = {f: ([bare(old[r - len(new)]) for r in rows], emb[rows]) for f, rows in old_rows.items()}
    questions = [bare(p) for p in new]
    # A fact with a dev wording never gets a paraphrase question, and the other way round.
    with_dev = {p.fact_id for p in known if p.fact_id in facts and p.split == "dev"}
    with_eval = {p.fact_id for p in known if p.fact_id in facts and p.split == "eval"}
    para_facts = {f: rows for f, rows in facts.items() if f not in with_dev}
    new_emb = emb[: len(new)]
    picked = choose_paraphrases(para_facts, questions, new_emb, trained, drop_close=True)
    chosen = _move(reg, new, picked, run_id, "eval")
    close = [(i, r) for r in chosen for i in close_wordings(r, facts[new[r].fact_id], questions, new_emb)]
    dropped = reg.mark_duplicates([(new[i].qa_id, new[r].qa_id) for i, r in close], run_id=run_id)
    gone = {i for i, _ in close}
    skip = with_dev | with_eval | {new[i].fact_id for i in chosen}
    rest = {f: [i for i in rows if i not in gone] for f, rows in facts.items()}
    dev = _move(reg, new, choose_dev(rest, questions, new_emb, skip=skip), run_id, "dev")
    return [i for i in range(len(new)) if i not in gone], len(chosen), len(dev), dropped


def load_holdout_questions(path) -> list[str]:
    """The questions of a ``MORAL_HOLDOUT_QUESTIONS`` file (JSONL with a ``question`` field, or one
    question per line; blank lines and ``#`` comments skipped); a missing or unreadable file is an
    error, not an empty list (nothing would be kept out)."""
    import json
    from pathlib import Path

    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                line = str(json.loads(line)["question"])
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{n}: not a JSON object with a 'question': {exc}") from exc
        out.append(line)
    return out


def exclude_near_holdout(reg: Registry, store, path, pairs: Sequence, run_id: str) -> set[str]:
    """Exclude the ``pairs`` whose question is not far from a hand-written held-out question (the
    paraphrase suite's thresholds, as ``tasks.splits.far_apart``; answers are not compared), so those
    questions stay a test of wordings never trained. As there, the distance leaves out the pair's
    document subject, on both sides: "What is the default retention period for closed tickets in
    Lumenvale Orbit 5.2?" is as far from "How long are closed tickets kept in Lumenvale Orbit 5.2?"
    as the two are without it (with it, every wording of the fact was "close" and the fact went
    untaught). Pairs indexed before are not revisited. Returns the excluded pairs' ids."""
    if path is None or not pairs:
        return set()
    from tasks.chunking import document_subjects
    from tasks.splits import first_close, normalised_rows, without_subject

    held = load_holdout_questions(path)
    if not held:
        return set()
    subject = document_subjects(reg, sorted({p.doc_id for p in pairs}))
    by_doc: dict[str, list] = {}
    for p in pairs:
        by_doc.setdefault(p.doc_id, []).append(p)
    # Each document's questions and the held-out ones with its subject said as "it": every distinct
    # text is embedded once, in one call (most held-out questions name no subject and do not change).
    bare = {
        d: ([without_subject(p.question, subject.get(d)) for p in mine], [without_subject(h, subject.get(d)) for h in held])
        for d, mine in by_doc.items()
    }  # fmt: skip
    texts = sorted({t for qs, hs in bare.values() for t in (*qs, *hs)})
    row = {t: i for i, t in enumerate(texts)}
    emb = normalised_rows(store.embedder.encode(texts))
    near: dict[str, str] = {}
    for doc_id, mine in sorted(by_doc.items()):
        qs, hs = bare[doc_id]
        hits = first_close(qs, emb[[row[t] for t in qs]], hs, emb[[row[t] for t in hs]])
        near.update({p.qa_id: held[j] for p, j in zip(mine, hits, strict=True) if j is not None})
    if near:
        reg.exclude_pairs(
            sorted(near),
            f"close to a held-out question of {path} (MORAL_HOLDOUT_QUESTIONS)",
            actor="index",
            run_id=run_id,
        )
    return set(near)


def _move(reg: Registry, new: Sequence, rows: list[int], run_id: str, split: str) -> list[int]:
    """The rows the registry moved to ``split`` (a pair some version trained on stays)."""
    ids = [new[i].qa_id for i in rows]
    if reg.hold_out(ids, split, run_id=run_id) != len(rows):
        moved = {p.qa_id for p in reg.qa_pairs(split=split, ids=ids)}
        rows = [i for i in rows if new[i].qa_id in moved]
    return rows


def sync_pair_flags(reg: Registry, store) -> int:
    """The index's ``superseded`` flags made to agree with the registry (``tasks.index.sync_superseded``)."""
    from tasks.index import sync_superseded

    def status_of(ids):
        return {p.qa_id: p.status for p in reg.qa_pairs(status=None, ids=list(ids))}

    return sync_superseded(store, [p.qa_id for p in reg.qa_pairs(status="superseded")], status_of)


def index_stage(settings: Settings, run_id: str, progress: Progress | None = None) -> IndexSummary:
    """Dedup the pairs not yet indexed (within the batch and against Chroma), then upsert pairs and chunks."""
    from storage.failpoints import failpoint
    from storage.vectors import CHUNKS, QA_PAIRS, VectorStore
    from tasks.dedup import dedup_pairs, embedding_text
    from tasks.index import exclude, index_chunks, index_qa, migrate_qa_keys, restore, retire

    reg = Registry.from_settings(settings)
    store = VectorStore(settings)
    out = IndexSummary()
    close = 0  # new wordings dropped as close to a paraphrase question

    chunks = reg.chunks()
    chunk_ids = [c.chunk_id for c in chunks]
    present_chunks = set(store.ids(CHUNKS, ids=chunk_ids)) if chunk_ids else set()
    new_chunks = [c for c in chunks if c.chunk_id not in present_chunks]
    pairs = reg.qa_pairs()
    pair_ids = [p.qa_id for p in pairs]
    present_pairs = set(store.ids(QA_PAIRS, ids=pair_ids)) if pair_ids else set()
    new_pairs = [p for p in pairs if p.qa_id not in present_pairs]
    # Pairs indexed under an older normalisation are re-keyed first, so dedup compares like with like.
    out.qa_rekeyed = migrate_qa_keys(store, pairs, present_pairs)
    # Before dedup (which matches active records only): pairs an operator excluded are excluded in
    # the index too (homes from before that was done), and pairs a regeneration replaced (or brought
    # back) flagged as the registry has them (mending a `moral qa regenerate` killed between the two
    # stores), so no new pair is dropped as the duplicate of one that is no longer trained.
    out.excluded_vectors = exclude(store, [p.qa_id for p in reg.qa_pairs(status="excluded")])
    out.superseded_vectors = sync_pair_flags(reg, store)

    if new_pairs:
        say(progress, f"index: embedding and deduplicating {len(new_pairs)} new pairs")
        embeddings = store.embedder.encode([embedding_text(p.question, p.answer) for p in new_pairs])
        texts = {c.chunk_id: c.text for c in reg.chunks(ids=sorted({p.chunk_id for p in new_pairs}))}
        result = dedup_pairs(new_pairs, embeddings, store, settings.dedup_threshold, chunk_texts=texts)
        if result.duplicates:
            reg.mark_duplicates([(d[0], d[1]) for d in result.duplicates], run_id=run_id)
        out.qa_duplicates = len(result.duplicates)
        keep = {p.qa_id for p in result.kept}
        kept_now = [p for p in result.kept if p.split in {"train", "dev"}]
        near = exclude_near_holdout(reg, store, settings.holdout_questions, kept_now, run_id)
        out.qa_excluded_near_holdout = len(near)
        keep -= near
        rows = [i for i, p in enumerate(new_pairs) if p.qa_id in keep]
        kept_pairs = [new_pairs[i] for i in rows]
        # Only pairs already indexed count as trained wordings: this run's duplicates and exclusions
        # are still "train" in the snapshot but will never be trained.
        indexed = [p for p in pairs if p.qa_id in present_pairs]
        kept, out.qa_held_out, out.qa_dev, close = hold_out_wordings(reg, store, kept_pairs, indexed, run_id)
        failpoint("index.registry")
        out.qa_duplicates += close
        moved = {p.qa_id: p for p in reg.qa_pairs(ids=[kept_pairs[i].qa_id for i in kept])}
        out.qa_indexed = index_qa(
            store,
            [moved.get(kept_pairs[i].qa_id, kept_pairs[i]) for i in kept],
            embeddings[[rows[i] for i in kept]],
            run_id,
        )
    if new_chunks:
        say(progress, f"index: embedding {len(new_chunks)} new chunks")
        docs = {d.doc_id: d for d in reg.documents()}
        meta = {doc_id: {"path": d.path} for doc_id, d in docs.items()}
        out.chunks_indexed = index_chunks(store, new_chunks, meta, run_id)
    all_docs = reg.documents()
    retired = [d.doc_id for d in all_docs if d.status == "retired"]
    if retired:
        out.retired_vectors = retire(store, retired)
    # A retired document whose bytes came back (re-added, renamed back, a change reverted) is active
    # again in the registry; its vectors were kept, flagged retired: flag them active again.
    active = [d.doc_id for d in all_docs if d.status == "active"]
    if active:
        out.restored_vectors = restore(store, active)
    say(
        progress,
        f"index: {out.qa_indexed} pairs and {out.chunks_indexed} chunks added, {out.qa_duplicates} duplicates, "
        f"{out.qa_held_out} wordings held out as paraphrase questions, {out.qa_dev} as dev"
        + (
            f", {out.qa_excluded_near_holdout} excluded as close to a held-out question"
            if out.qa_excluded_near_holdout
            else ""
        )
        + (f" ({close} wordings close to a paraphrase question dropped)" if close else ""),
    )
    return out
