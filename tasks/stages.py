"""The refresh stages as plain functions over the registry, the index and the adapter store.

Each stage reads what it needs from the registry, does its work through the stage modules
(``ingest``, ``qa``, ``dedup``, ``index``, ``train``, ``evaluate``, ``gate``) and writes the result
back in batched transactions.  Every stage is idempotent: it only acts on what the registry says is
still to do, so a rerun or a run resumed after a crash repeats nothing it already paid for.  Models
and the embedding model are loaded only when a stage has work.  The Prefect ``@task`` wrappers are
in :mod:`tasks.prefect_tasks`; tests call these functions directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from storage.corpus import DocumentIn
from storage.files import write_json_atomic
from storage.records import Chunk as ChunkRecord
from storage.records import Evaluation
from storage.records import QAPair as QARecord
from storage.registry import Registry
from storage.settings import Settings

log = logging.getLogger("moral.stages")
Progress = Callable[[str], None]


def _say(progress: Progress | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------------------------------
# ingest


@dataclass
class IngestSummary:
    documents_new: list[str] = field(default_factory=list)
    documents_unchanged: int = 0
    documents_renamed: list[str] = field(default_factory=list)
    documents_retired: list[str] = field(default_factory=list)
    documents_quarantined: list[dict] = field(default_factory=list)
    chunks_added: int = 0


def ingest_stage(
    settings: Settings, source: Path, run_id: str, progress: Progress | None = None
) -> IngestSummary:
    """Scan ``source``, work out the delta against the registry, parse and chunk what is new."""
    from tasks.chunking import chunk_pages
    from tasks.ingest import ParseError, parse_document, plan_delta, scan_source

    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {source} does not exist")
    reg = Registry.from_settings(settings)
    out = IngestSummary()
    scan = scan_source(source, settings.max_file_mb)
    docs = reg.documents()
    known = {d.doc_id: d.path for d in docs}
    # Only documents under this source root can be found changed or deleted by its scan: documents
    # ingested from another folder (another team's, an earlier batch's) stay as they are.
    active_paths = {
        d.path: d.doc_id for d in docs if d.status == "active" and Path(d.path).is_relative_to(source)
    }
    status_of = {d.doc_id: d for d in docs}
    delta = plan_delta(scan.files, known, active_paths)

    if settings.qa_backend == "openai" and delta.to_process:
        _warm_openai_client()  # ~1 s of imports the QA stage needs, overlapped with parsing
    _resolve_stale_quarantine(reg, source, scan, run_id)
    for q in scan.rejected:
        reg.quarantine(q.path, q.sha256, q.reason, run_id)
        out.documents_quarantined.append({"path": str(q.path), "reason": q.reason})
    for f in delta.unchanged:
        doc = status_of.get(f.sha256)
        if doc is not None and doc.status == "quarantined":
            # Same bytes fail the same way: not parsed again, but still reported until fixed.
            out.documents_quarantined.append({"path": str(f.path), "reason": doc.reason or "quarantined"})
        else:
            out.documents_unchanged += 1
    for r in delta.renamed:
        doc = status_of.get(r.file.sha256)
        if doc is not None and doc.status == "quarantined":
            # Known bad bytes under a new name are still bad: quarantined at the new path, not revived.
            reason = doc.reason or "quarantined"
            reg.quarantine(r.file.path, r.file.sha256, reason, run_id)
            out.documents_quarantined.append({"path": str(r.file.path), "reason": reason})
            continue
        reg.upsert_document(
            r.file.sha256,
            str(r.file.path),
            source_root=str(source),
            kind=r.file.kind,
            size=r.file.size,
            run_id=run_id,
        )
        out.documents_renamed.append(str(r.file.path))
    for c in delta.changed:
        reg.retire_document(c.old_sha256, run_id, reason=f"{c.file.path} changed: replaced by new content")
        out.documents_retired.append(str(c.file.path))
    for d in delta.deleted:
        reg.retire_document(d.sha256, run_id, reason=f"{d.path} deleted from the source")
        out.documents_retired.append(d.path)

    chunks: list[ChunkRecord] = []
    accepted: list[DocumentIn] = []
    for f in delta.to_process:
        try:
            parsed = parse_document(f, settings.max_pdf_pages)
        except ParseError as exc:
            reason = exc.reason
        except Exception as exc:  # a parser bug on one odd file must not stop the run
            log.exception("parsing %s failed", f.path)
            reason = f"parse failed: {type(exc).__name__}: {exc}"
        else:
            accepted.append(DocumentIn(f.sha256, str(f.path), str(source), f.kind, f.size))
            out.documents_new.append(str(f.path))
            for c in chunk_pages(f.sha256, parsed.pages, settings.chunk_tokens, settings.chunk_overlap):
                chunks.append(
                    ChunkRecord(c.chunk_id, c.doc_id, c.idx, c.text, c.page, c.n_tokens, run_id=run_id)
                )
            continue
        reg.quarantine(f.path, f.sha256, reason, run_id)
        out.documents_quarantined.append({"path": str(f.path), "reason": reason})
    if accepted:  # documents and their chunks in one transaction: never a document without chunks
        _, out.chunks_added = reg.add_documents(accepted, chunks, run_id=run_id)
    _say(
        progress,
        f"ingest: {len(out.documents_new)} new, {out.documents_unchanged} unchanged, "
        f"{len(out.documents_retired)} retired, {len(out.documents_quarantined)} quarantined, "
        f"{out.chunks_added} chunks",
    )
    return out


def _resolve_stale_quarantine(reg: Registry, source: Path, scan, run_id: str) -> None:
    """Close the open quarantine entries under ``source`` whose file is gone or has other bytes now
    (fixed, or bad in a new way: that gets its own entry), so ``moral quarantine list`` shows what is
    still wrong. Entries for the same bytes at the same path stay open."""
    current = {str(f.path): f.sha256 for f in scan.files}
    rejected = {str(q.path) for q in scan.rejected}
    prefix = str(source).rstrip("/") + "/"
    stale = [
        e.id
        for e in reg.quarantined()
        if e.path.startswith(prefix)
        and e.path not in rejected
        and (e.path not in current or e.sha256 != current[e.path])
    ]
    if stale:
        reg.resolve_quarantine(stale, "file fixed or removed from the source", run_id=run_id)


def _warm_openai_client() -> None:
    """Load the openai client's modules in a daemon thread, so that the QA stage finds them loaded."""
    import threading

    from tasks.qa_openai import warm_up

    threading.Thread(target=warm_up, name="warm-openai", daemon=True).start()


# --------------------------------------------------------------------------------------------------
# QA generation


@dataclass
class QASummary:
    chunks_pending: int = 0
    qa_generated: int = 0
    qa_rejected: int = 0
    qa_failed: list[dict] = field(default_factory=list)
    skipped_by_cap: int = 0
    llm_calls: int = 0
    llm_tokens: int = 0
    cache_hits: int = 0
    generator: str | None = None


def make_generator(settings: Settings):
    """The configured QA generator; the openai backend is never switched on implicitly."""
    if settings.qa_backend == "openai":
        from tasks.qa_openai import OpenAIQAGenerator

        base_url = settings.resolved_qa_base_url()
        if not settings.qa_model:
            raise ValueError("MORAL_QA_BACKEND=openai needs MORAL_QA_MODEL (the model name at the endpoint)")
        return OpenAIQAGenerator(
            base_url=base_url,
            api_key=settings.resolved_qa_api_key(),
            model=settings.qa_model,
            timeout_s=settings.qa_timeout_s,
            max_retries=settings.qa_max_retries,
            pairs_per_chunk=settings.qa_pairs_per_chunk,
        )
    from moe.base_model import load_base_model, resolve_base_model
    from tasks.qa_local import LocalQAGenerator

    model, tokenizer = load_base_model(resolve_base_model(settings.base_model, settings.model_cache))
    return LocalQAGenerator(model, tokenizer, pairs_per_chunk=settings.qa_pairs_per_chunk)


def qa_stage(
    settings: Settings,
    run_id: str,
    progress: Progress | None = None,
    generator=None,
    chunk_ids: Sequence[str] | None = None,
) -> QASummary:
    """QA pairs for every active chunk that has none yet (cache first; failures recorded for retry).

    ``chunk_ids`` restricts the stage to those chunks: one shard of a run fanned out over a task
    runner (see ``qa_shards``); the spend caps in ``settings`` then apply to the shard.
    """
    from tasks.qa import RegistryCache, generate_for_chunks

    reg = Registry.from_settings(settings)
    chunks = reg.chunks_without_qa()
    if chunk_ids is not None:
        wanted = set(chunk_ids)
        chunks = [c for c in chunks if c.chunk_id in wanted]
    out = QASummary(chunks_pending=len(chunks))
    if not chunks:
        _say(progress, "qa: no new chunks, no LLM call")
        return out
    gen = generator or make_generator(settings)
    out.generator = getattr(gen, "name", type(gen).__name__)
    _say(progress, f"qa: generating question/answer pairs for {len(chunks)} chunks with {out.generator}")

    step = max(1, len(chunks) // 20)

    def report(done: int, total: int) -> None:
        # About 20 lines per run: in a flow every line is a log record sent to the Prefect API.
        if done == total or done % step == 0:
            _say(progress, f"qa: {done}/{total} chunks")

    result = generate_for_chunks(
        chunks,
        gen,
        RegistryCache(reg),
        settings.qa_concurrency,
        max_calls=settings.max_llm_calls,
        max_tokens=settings.max_llm_tokens,
        progress=report,
    )
    records = [
        QARecord(
            p.qa_id, p.chunk_id, p.doc_id, p.question, p.answer, p.split,  # type: ignore[arg-type]
            generator=p.generator, prompt_version=p.prompt_version, run_id=run_id, fact_id=p.fact_id,
        )
        for p in result.pairs
    ]  # fmt: skip
    failed = {cid for cid, _ in result.failed}
    skipped = set(result.skipped_by_cap)
    done = [c.chunk_id for c in chunks if c.chunk_id not in failed and c.chunk_id not in skipped]
    # Pairs, done flags and failures in one transaction; a failed chunk is retried by the next run.
    out.qa_generated = reg.record_qa_results(records, done, result.failed, run_id=run_id)
    out.qa_failed = [{"chunk_id": cid, "error": err} for cid, err in result.failed]
    out.qa_rejected = len(result.rejected)
    out.skipped_by_cap = len(skipped)
    out.llm_calls = result.llm_calls
    out.llm_tokens = result.tokens
    out.cache_hits = result.cache_hits
    _say(
        progress,
        f"qa: {out.qa_generated} pairs kept, {out.qa_rejected} rejected by validation, {len(failed)} chunks "
        f"failed, {out.skipped_by_cap} left for the next run (spend cap); {out.llm_calls} LLM calls",
    )
    return out


def qa_shards(settings: Settings, shards: int) -> list[list[str]]:
    """The pending chunks split into at most ``shards`` lists of ids (documents kept together, so
    a document's chunks share one worker's cache warmth), for fanning QA out over a task runner."""
    pending = Registry.from_settings(settings).chunks_without_qa()
    by_doc: dict[str, list[str]] = {}
    for c in pending:
        by_doc.setdefault(c.doc_id, []).append(c.chunk_id)
    out: list[list[str]] = [[] for _ in range(max(1, min(shards, len(pending))))]
    for ids in sorted(by_doc.values(), key=len, reverse=True):  # largest first onto the lightest shard
        min(out, key=len).extend(ids)
    return [ids for ids in out if ids]


def merge_qa(parts: Sequence[QASummary]) -> QASummary:
    """One summary for a QA stage run as several shards."""
    out = QASummary(chunks_pending=sum(p.chunks_pending for p in parts))
    for p in parts:
        out.generator = out.generator or p.generator
        out.qa_generated += p.qa_generated
        out.qa_rejected += p.qa_rejected
        out.qa_failed += p.qa_failed
        out.skipped_by_cap += p.skipped_by_cap
        out.llm_calls += p.llm_calls
        out.llm_tokens += p.llm_tokens
        out.cache_hits += p.cache_hits
    return out


# --------------------------------------------------------------------------------------------------
# dedup + index


@dataclass
class IndexSummary:
    chunks_indexed: int = 0
    qa_indexed: int = 0
    qa_duplicates: int = 0
    retired_vectors: int = 0
    restored_vectors: int = 0
    qa_held_out: int = 0  # new train-fact wordings held out as paraphrase eval questions
    qa_rekeyed: int = 0  # indexed pairs re-keyed under the current answer normalisation


def hold_out_paraphrases(
    reg: Registry, store, new: Sequence, known: Sequence, run_id: str
) -> tuple[list, int]:
    """The new pairs, with one far wording of each train fact moved to ``eval`` (``tasks.splits``),
    compared with the fact's other new wordings and with its wordings already stored as train; and
    how many were moved."""
    from dataclasses import replace

    from tasks.splits import choose_paraphrases, normalised_rows

    facts: dict[str, list[int]] = {}
    for i, p in enumerate(new):
        if p.split == "train":
            facts.setdefault(p.fact_id, []).append(i)
    if not facts:
        return list(new), 0
    new_ids = {p.qa_id for p in new}
    old = [p for p in known if p.fact_id in facts and p.split == "train" and p.qa_id not in new_ids]
    emb = normalised_rows(store.embedder.encode([p.question for p in new] + [p.question for p in old]))
    old_rows: dict[str, list[int]] = {}
    for j, p in enumerate(old):
        old_rows.setdefault(p.fact_id, []).append(len(new) + j)
    trained = {f: ([old[r - len(new)].question for r in rows], emb[rows]) for f, rows in old_rows.items()}
    chosen = choose_paraphrases(facts, [p.question for p in new], emb[: len(new)], trained)
    if reg.hold_out_paraphrases([new[i].qa_id for i in chosen], run_id=run_id) != len(chosen):
        held = {p.qa_id for p in reg.qa_pairs(split="eval", ids=[new[i].qa_id for i in chosen])}
        chosen = [i for i in chosen if new[i].qa_id in held]  # a pair some version trained on stays
    out = list(new)
    for i in chosen:
        out[i] = replace(new[i], split="eval")
    return out, len(chosen)


def index_stage(settings: Settings, run_id: str, progress: Progress | None = None) -> IndexSummary:
    """Dedup the pairs not yet indexed (within the batch and against Chroma), then upsert pairs and chunks."""
    from storage.vectors import CHUNKS, QA_PAIRS, VectorStore
    from tasks.dedup import dedup_pairs, embedding_text
    from tasks.index import index_chunks, index_qa, migrate_qa_keys, restore, retire

    reg = Registry.from_settings(settings)
    store = VectorStore(settings)
    out = IndexSummary()

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

    if new_pairs:
        _say(progress, f"index: embedding and deduplicating {len(new_pairs)} new pairs")
        embeddings = store.embedder.encode([embedding_text(p.question, p.answer) for p in new_pairs])
        texts = {c.chunk_id: c.text for c in reg.chunks(ids=sorted({p.chunk_id for p in new_pairs}))}
        result = dedup_pairs(new_pairs, embeddings, store, settings.dedup_threshold, chunk_texts=texts)
        if result.duplicates:
            reg.mark_duplicates([(d[0], d[1]) for d in result.duplicates], run_id=run_id)
        out.qa_duplicates = len(result.duplicates)
        keep = {p.qa_id for p in result.kept}
        rows = [i for i, p in enumerate(new_pairs) if p.qa_id in keep]
        kept, out.qa_held_out = hold_out_paraphrases(reg, store, [new_pairs[i] for i in rows], pairs, run_id)
        out.qa_indexed = index_qa(store, kept, embeddings[rows], run_id)
    if new_chunks:
        _say(progress, f"index: embedding {len(new_chunks)} new chunks")
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
    _say(
        progress,
        f"index: {out.qa_indexed} pairs and {out.chunks_indexed} chunks added, {out.qa_duplicates} duplicates",
    )
    return out


# --------------------------------------------------------------------------------------------------
# train


@dataclass
class TrainSummary:
    version: int | None = None
    reason: str | None = None  # why nothing was trained
    resumed: bool = False  # an existing candidate (from a stopped or crashed run) is taken up
    reused_artifact: bool = False
    delta_pairs: int = 0
    replay_pairs: int = 0
    metrics: dict = field(default_factory=dict)
    replay: dict = field(default_factory=dict)  # how the replay sample was chosen (tasks.replay)
    bank: dict = field(default_factory=dict)  # bank initialisation: used, chosen, why, artifact


def usable_champion(reg: Registry, base_sha256: str) -> tuple[object | None, str | None]:
    """The champion version if its adapter fits the current base model, else (None, why not)."""
    champion = reg.champion()
    if champion is None:
        return None, None
    version = reg.get_version(champion)
    if version.base_model_sha256 and version.base_model_sha256 != base_sha256:
        return None, (
            f"champion {version.name} was trained on another base model (sha256 {version.base_model_sha256[:12]}...); "
            "it is not loaded and the base model is the reference"
        )
    return version, None


def rejected_with_same_inputs(
    reg: Registry, pairs: list, settings: Settings, kind: str, base_sha256: str
) -> str | None:
    """The rejected version trained on exactly these pairs, parameters and base model, if any:
    training it again would rebuild the same adapter and be rejected again, night after night."""
    from tasks.train import data_hash, train_params

    dhash, params = data_hash(pairs), train_params(settings, kind)
    for v in reg.list_versions(status="rejected"):
        recorded = {k: val for k, val in (v.params or {}).items() if k != "bank_init"}
        if v.data_hash == dhash and recorded == params and v.base_model_sha256 == base_sha256:
            return v.name
    return None


def train_stage(
    settings: Settings, run_id: str, progress: Progress | None = None, kind: str = "moral"
) -> TrainSummary:
    """Train a candidate on the train pairs no shipped version has learned (plus replay), and register it."""
    from tasks.bank import bank_for_delta, record_selection
    from tasks.replay import replay_for_delta
    from tasks.train import TrainPair, train_candidate

    reg = Registry.from_settings(settings)
    pending = reg.list_versions(status="candidate")
    if pending:
        v = pending[-1]
        _say(progress, f"train: taking up candidate {v.name} left by an earlier run (no retraining)")
        return TrainSummary(version=v.version, resumed=True)

    # The delta: train pairs no shipped version has learned. A rejected version's pairs come back
    # (with whatever arrived since), so a rejection never loses knowledge for good.
    settled = reg.settled_pairs()
    active_train = reg.qa_pairs(split="train")
    delta = [p for p in active_train if p.qa_id not in settled]
    if not delta:
        return TrainSummary(reason="no new training pairs since the last promoted version: nothing to train")
    # Replay: earlier train pairs nearest the delta, near-duplicates dropped (tasks.replay).
    replay, replay_choice = replay_for_delta(settings, delta, [p for p in active_train if p.qa_id in settled])

    pairs = [TrainPair(p.qa_id, p.question, p.answer, 0) for p in delta]
    pairs += [TrainPair(p.qa_id, p.question, p.answer, 1) for p in replay]

    from moe.base_model import base_model_identity

    base_path, identity = base_model_identity(settings.base_model, settings.model_cache)
    same = rejected_with_same_inputs(reg, pairs, settings, kind, identity["sha256"])
    if same is not None:
        return TrainSummary(
            reason=(
                f"{same} was trained on exactly these pairs with these parameters and rejected: nothing "
                f"new to try (add documents, change a parameter, or `moral promote {same} --force`)"
            )
        )
    champion, _why = usable_champion(reg, identity["sha256"])
    warm = settings.warm_start and champion is not None and bool(champion.artifact_uri)
    selection, bank_reason = bank_for_delta(settings, reg, delta, base_path, identity["sha256"], warm, kind)
    if selection is not None:
        _say(
            progress,
            f"train: experts 0-{len(selection.chosen) - 1} from the bank: {', '.join(selection.chosen)}",
        )
    _say(progress, f"train: {kind} adapter on {len(delta)} new and {len(replay)} replayed pairs")

    def on_step(info: dict) -> None:
        step = info.get("step", 0)
        if step == 1 or step % 10 == 0:
            _say(
                progress,
                f"train: step {step} epoch {info.get('epoch')} loss {info.get('loss', float('nan')):.4f}",
            )

    parent_dir = Path(champion.artifact_uri) if champion is not None and champion.artifact_uri else None
    outcome = train_candidate(
        settings,
        base_path,
        identity["sha256"],
        pairs,
        parent_dir=parent_dir,
        kind=kind,
        progress=on_step,
        bank_init=selection,
    )
    roles = {p.qa_id: "delta" for p in delta} | {p.qa_id: "replay" for p in replay}
    version = reg.create_version(
        run_id=run_id,
        base_model=identity.get("name") or str(base_path),
        base_model_sha256=identity["sha256"],
        data_hash=outcome.data_hash,
        params=outcome.params,
        parent_version=champion.version if champion is not None else None,
        kind=kind,  # type: ignore[arg-type]
        artifact_uri=str(outcome.artifact_dir),
        artifact_sha256=outcome.sha256,
        actor="refresh",
        trained_pairs=roles,
    )
    save_training_log(settings, version, outcome.metrics)
    bank = {"used": selection is not None, "reason": bank_reason}
    if kind == "moral":
        bank["artifact"] = str(record_selection(settings, reg, version, selection, bank_reason, run_id))
        bank["chosen"] = selection.chosen if selection is not None else []
    _say(progress, f"train: registered candidate v{version} ({outcome.metrics.get('seconds')} s)")
    return TrainSummary(
        version=version,
        reused_artifact=outcome.reused,
        delta_pairs=len(delta),
        replay_pairs=len(replay),
        metrics={k: v for k, v in outcome.metrics.items() if k not in ("losses", "aux_losses")},
        replay=replay_choice.summary(),
        bank=bank,
    )


# --------------------------------------------------------------------------------------------------
# evaluate


@dataclass
class EvaluateSummary:
    version: int
    has_champion: bool
    champion_note: str | None
    sizes: dict[str, int] = field(default_factory=dict)
    means: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def scores_path(settings: Settings, version: int) -> Path:
    return settings.evaluations_dir / f"v{version}.json"


def training_log_path(settings: Settings, version: int) -> Path:
    return settings.training_dir / f"v{version}.json"


def save_training_log(settings: Settings, version: int, metrics: dict) -> Path:
    """Keep the loss curve and router statistics of a version's training (for its plots and report);
    the adapter directory itself is immutable and checksummed, so this lives beside it."""
    keep = (
        "losses",
        "aux_losses",
        "expert_stats",
        "steps",
        "seconds",
        "train_pairs",
        "first_loss",
        "final_loss",
    )
    path = training_log_path(settings, version)
    return write_json_atomic(path, {"version": version, **{k: metrics[k] for k in keep if k in metrics}})


def held_out_suites(
    settings: Settings, reg: Registry, version: int, docs: set[str] | None = None
) -> dict[str, list]:
    """Eval pairs of ``docs`` (default: the version's delta documents) as the two held-out suites,
    re-checked against every pair any version was trained on (``tasks.splits``):

    * an eval question is scored only when it is far (Jaccard ≤ 0.5 and cosine ≤ 0.85) from every
      trained question of its document, under any of the document's versions (same path): a closer
      one is dropped, never scored, whatever fact it was filed under;
    * ``paraphrase`` — the rest whose fact was trained (same fact id, or a trained pair of the same
      document whose answer agrees);
    * ``unseen`` — the rest, facts no trained pair asks about.
    """
    from storage.vectors import Embedder
    from tasks.dedup import answers_agree
    from tasks.splits import far_apart, normalised_rows

    lineage = reg.trained_pairs(version)
    everything = {p.qa_id: p for p in reg.qa_pairs(status=None)}
    if docs is None:
        docs = {everything[q].doc_id for q, role in lineage.items() if role == "delta" and q in everything}
    path_of = {d.doc_id: d.path for d in reg.documents()}
    trained_ids = set(lineage) | set(reg.trained_pairs())
    trained = [everything[q] for q in sorted(trained_ids) if q in everything]
    by_fact: dict[str, list] = {}
    by_path: dict[str, list] = {}
    for p in trained:
        by_fact.setdefault(p.fact_id, []).append(p)
        by_path.setdefault(path_of.get(p.doc_id, p.doc_id), []).append(p)
    candidates = [p for p in reg.qa_pairs(split="eval") if p.doc_id in docs]
    out: dict[str, list] = {"paraphrase": [], "unseen": []}
    if not candidates:
        return out
    paths = {path_of.get(p.doc_id, p.doc_id) for p in candidates}
    texts = sorted({p.question for p in candidates} | {t.question for x in paths for t in by_path.get(x, [])})
    row = {t: i for i, t in enumerate(texts)}
    emb = normalised_rows(Embedder.from_settings(settings).encode(texts))
    for p in candidates:
        same_doc = by_path.get(path_of.get(p.doc_id, p.doc_id), [])
        if not far_apart(p.question, [t.question for t in same_doc], emb[row[p.question]],
                         emb[[row[t.question] for t in same_doc]] if same_doc else None):  # fmt: skip
            continue
        fact_trained = p.fact_id in by_fact or any(answers_agree(t.answer, p.answer) for t in same_doc)
        out["paraphrase" if fact_trained else "unseen"].append(p)
    return out


def build_suites(settings: Settings, reg: Registry, version: int) -> list:
    """The evaluation suites for a candidate, each document suite closed- and open-book:

    * ``paraphrase`` / ``unseen`` — the delta's held-out questions (see ``held_out_suites``);
    * ``trained_recall`` — a sample of the delta pairs it was trained on;
    * ``retention`` — held-out paraphrase questions of documents that *earlier* shipped versions were
      trained on (whether or not this version replayed them), for domain retention;
    * ``faith`` / ``filter`` / ``refusal`` — the 5L-bench suites from the delta's held-out pairs;
    * ``world_knowledge`` — the FanOutQA holdout, closed-book, NLL in the format-neutral prompt;
    * ``drift`` — fixed general prompts, answered by the base model at evaluation time.
    """
    from tasks.evaluate import EvalItem, Suite
    from tasks.fivel import SourcedPair, fivel_suites
    from tasks.holdout import drift_prompts, holdout_sample

    lineage = reg.trained_pairs(version)
    active = {p.qa_id: p for p in reg.qa_pairs()}
    delta_docs = {active[q].doc_id for q, role in lineage.items() if role == "delta" and q in active}
    earlier_docs: set[str] = set()
    for v in reg.list_versions():
        if v.version < version and v.status in ("promoted", "revoked"):  # knowledge that shipped
            earlier_docs |= {active[q].doc_id for q in reg.trained_pairs(v.version) if q in active}
    held = held_out_suites(settings, reg, version, delta_docs)
    # Retention: what earlier versions shipped, asked the held-out way (far paraphrases of trained
    # facts of their documents); facts never trained are not knowledge that could be forgotten.
    retained = held_out_suites(settings, reg, version, earlier_docs - delta_docs)["paraphrase"]
    recall = sorted(
        (active[q] for q, r in lineage.items() if r == "delta" and q in active), key=lambda p: p.qa_id
    )[: settings.recall_sample]
    suites = []
    for name, pairs, extras in (
        ("paraphrase", held["paraphrase"], ("qr", "fl")),
        ("unseen", held["unseen"], ()),
        ("trained_recall", recall, ()),
        ("retention", retained, ()),
    ):
        if not pairs and name != "paraphrase":
            continue  # paraphrase stays, even empty: the gate says why it cannot promote
        items = [EvalItem(p.question, p.answer, ref=p.fact_id) for p in pairs]
        suites.append(Suite(name, items, extras=extras))
        if pairs:
            suites.append(
                Suite(name, open_book_items(settings, items, k=settings.open_book_k), "open", extras=extras)
            )
    new = held["paraphrase"] + held["unseen"]
    if new and settings.fivel_size > 0:
        chunks = {c.chunk_id: c for c in reg.chunks()}
        sourced = [
            SourcedPair(p.question, p.answer, chunks[p.chunk_id].text, p.doc_id)
            for p in sorted(new, key=lambda p: p.qa_id)
            if p.chunk_id in chunks
        ]
        pool = [(c.doc_id, c.text) for c in chunks.values() if c.doc_id not in delta_docs] or [
            (c.doc_id, c.text) for c in chunks.values()
        ]
        suites += fivel_suites(sourced, pool, settings.fivel_size, settings.fivel_distractors, settings.seed)
    holdout = holdout_sample(settings.holdout_size, settings.seed)
    if holdout:
        items = [EvalItem(h.question, h.answer) for h in holdout]
        suites.append(Suite("world_knowledge", items, nll=True, chat=False))
    if prompts := drift_prompts(settings.drift_size, settings.seed):
        suites.append(Suite("drift", [EvalItem(q, "") for q in prompts], kind="drift"))
    return suites


def open_book_items(settings: Settings, items: list, k: int = 3) -> list:
    """The items, each with the top-k chunks retrieved from the index for its question as context."""
    from dataclasses import replace

    from storage.vectors import CHUNKS, VectorStore

    store = VectorStore(settings)
    hits = store.query(CHUNKS, [it.question for it in items], k=k, where={"status": "active"})
    return [
        replace(it, context="\n\n".join(h.text for h in row)) for it, row in zip(items, hits, strict=True)
    ]


def base_memo(settings: Settings, base_sha256: str):
    """The base model's memoised evaluation outputs, shared by every data home on this machine."""
    from tasks.evaluate import BaseMemo

    return BaseMemo(settings.model_cache / "evaluations" / f"{base_sha256[:16]}.json", base_sha256)


def fact_documents(reg: Registry, fact_ids: Sequence[str]) -> dict[str, dict]:
    """fact_id -> {doc_id, path} of the document each fact comes from."""
    wanted = set(fact_ids)
    paths = {d.doc_id: d.path for d in reg.documents()}
    out: dict[str, dict] = {}
    for p in reg.qa_pairs(status=None):
        if p.fact_id in wanted and p.fact_id not in out:
            out[p.fact_id] = {"doc_id": p.doc_id, "path": paths.get(p.doc_id)}
    return out


def evaluate_stage(
    settings: Settings, run_id: str, version: int, progress: Progress | None = None, force: bool = False
) -> EvaluateSummary:
    """Base, champion and candidate on every suite; per-item scores saved for the gate, rows in the registry.

    ``force`` re-evaluates even when scores are saved (``moral eval --rerun``): the new scores replace
    the file atomically and the registry gains a new set of rows (older ones stay, append-only)."""
    from tasks.evaluate import evaluate_versions, evaluation_rows

    reg = Registry.from_settings(settings)
    cand = reg.get_version(version)
    path = scores_path(settings, version)
    from moe.base_model import base_model_identity

    base_path, identity = base_model_identity(settings.base_model, settings.model_cache)
    champion, note = usable_champion(reg, identity["sha256"])
    if champion is not None and champion.version == version:
        champion = None
    if path.exists() and not force:
        saved = json.loads(path.read_text())
        _say(progress, f"evaluate: v{version} already evaluated, reusing its scores")
        return EvaluateSummary(
            version, saved["has_champion"], saved.get("champion_note"), saved["sizes"], saved["means"]
        )

    from storage.artifacts import AdapterStore
    from storage.vectors import Embedder

    for v in [cand] + ([champion] if champion is not None else []):
        AdapterStore(Path(v.artifact_uri).parent).verify(Path(v.artifact_uri).name, v.artifact_sha256)
    suites = build_suites(settings, reg, version)
    sizes = {s.key: len(s.items) for s in suites}
    _say(progress, "evaluate: " + ", ".join(f"{k} n={n}" for k, n in sizes.items()))
    output = evaluate_versions(
        base_path,
        suites,
        candidate_dir=Path(cand.artifact_uri),
        champion_dir=Path(champion.artifact_uri) if champion is not None else None,
        max_new_tokens=settings.eval_max_new_tokens,
        embed=Embedder.from_settings(settings).encode,
        progress=lambda m: _say(progress, f"evaluate: {m}"),
        memo=base_memo(settings, identity["sha256"]),
    )
    rows = evaluation_rows(output, suites, seed=settings.seed)
    reg.record_evaluations(
        [Evaluation(version=version, run_id=run_id, **r) for r in rows]  # type: ignore[arg-type]
    )
    means = {
        key: {
            model: {m: float(sum(v) / len(v)) for m, v in metrics.items() if v}
            for model, metrics in by.items()
        }
        for key, by in output.scores.items()
    }
    samples = {
        key: [
            {
                "question": it.question,
                "gold": it.answer,
                **{m: output.predictions[key][m][i] for m in output.predictions[key]},
            }
            for i, it in enumerate(s.items[:10])
        ]
        for s in suites
        if (key := s.key) in output.predictions
    }
    write_json_atomic(  # atomic: the gate never reads half a file
        path,
        {
            "version": version,
            "has_champion": champion is not None,
            "champion_version": champion.version if champion is not None else None,
            "champion_note": note,
            "sizes": sizes,
            "means": means,
            "scores": output.scores,
            "samples": samples,
            # Per item of the document suites: the fact asked, its question and gold, and every
            # model's answer (per-document knowledge and per-fact diffs in the reports).
            "items": {
                s.key: [{"fact_id": it.ref, "question": it.question, "gold": it.answer} for it in s.items]
                for s in suites
                if s.key in output.predictions and any(it.ref for it in s.items)
            },
            "predictions": {
                s.key: output.predictions[s.key]
                for s in suites
                if s.key in output.predictions and any(it.ref for it in s.items)
            },
            "fact_docs": fact_documents(reg, [it.ref for s in suites for it in s.items if it.ref]),
        },
    )
    return EvaluateSummary(version, champion is not None, note, sizes, means)


# --------------------------------------------------------------------------------------------------
# promote


@dataclass
class PromoteSummary:
    version: int
    decision: str
    reasons: list[str]


def gate_decision(settings: Settings, version: int):
    """The gate's decision on a version's saved scores (pure: nothing is recorded) and its reasons,
    with the note on an unusable champion first; also used to preview a decision awaiting approval."""
    from tasks.gate import GateThresholds, decide

    path = scores_path(settings, version)
    if not path.exists():
        raise FileNotFoundError(f"v{version} has no saved evaluation ({path}): run the evaluate stage first")
    saved = json.loads(path.read_text())
    decision = decide(
        saved["scores"], GateThresholds.from_settings(settings), has_champion=saved["has_champion"]
    )
    reasons = ([saved["champion_note"]] if saved.get("champion_note") else []) + decision.reasons
    return saved, decision, reasons


def promote_stage(
    settings: Settings, run_id: str, version: int, progress: Progress | None = None
) -> PromoteSummary:
    """Apply the gate to the stored scores; record the decision and move the champion alias if promoted."""
    reg = Registry.from_settings(settings)
    saved, decision, reasons = gate_decision(settings, version)
    reg.set_version_metrics(
        version, {"evaluation": saved["means"], "sizes": saved["sizes"], "gate": decision.to_dict()}
    )
    if decision.override:  # audited: who weakened the gate for which version, and why
        reg.log_event(
            "gate.override",
            version=version,
            run_id=run_id,
            actor="gate",
            detail={"reason": decision.override, "weakened": settings.gate_weakened()},
        )
    reg.decide_version(version, decision.status, reasons, actor="gate", run_id=run_id)
    _say(progress, f"promote: v{version} {decision.status}")
    for r in reasons:
        _say(progress, f"  {r}")
    return PromoteSummary(version, decision.status, reasons)
