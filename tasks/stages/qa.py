"""The QA stage: generate question/answer pairs for chunks not yet done (local model or an
OpenAI-compatible endpoint), cached per chunk, with shards for parallel runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from storage.registry import Registry
from storage.settings import Settings
from tasks.stages.progress import Progress, say


@dataclass
class GenerationCounts:
    """What one generation over some chunks cost and left (QA stage and regenerate alike)."""

    qa_rejected: int = 0
    qa_failed: list[dict] = field(default_factory=list)
    skipped_by_cap: int = 0
    llm_calls: int = 0
    llm_tokens: int = 0
    cache_hits: int = 0


@dataclass
class QASummary(GenerationCounts):
    chunks_pending: int = 0
    qa_generated: int = 0
    generator: str | None = None
    fingerprint: str | None = None  # the generation recorded for the chunks done here
    chunks_on_old_fingerprint: int = 0  # done under another generation: `moral qa regenerate`


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
            wordings_per_fact=settings.qa_wordings_per_fact,
        )
    from moe.base_model import load_base_model, resolve_base_model
    from tasks.qa_local import LocalQAGenerator

    model, tokenizer = load_base_model(resolve_base_model(settings.base_model, settings.model_cache))
    return LocalQAGenerator(
        model, tokenizer, pairs_per_chunk=settings.qa_pairs_per_chunk, variants=settings.qa_wordings_per_fact
    )


def settings_fingerprint(settings: Settings) -> str | None:
    """The fingerprint (``tasks.qa.fingerprint``) of the generator ``make_generator`` builds from
    these settings, known without loading a model or opening a client (None: the settings name no
    generator, i.e. the openai backend without ``MORAL_QA_MODEL``)."""
    from tasks.qa import fingerprint

    if settings.qa_backend == "openai":
        if not settings.qa_model:
            return None
        from tasks.qa_openai import openai_prompt_version

        version = openai_prompt_version(settings.qa_pairs_per_chunk, settings.qa_wordings_per_fact)
        return fingerprint(settings.qa_model or "", version)
    from moe.base_model import BUNDLED_DIRNAME
    from tasks.qa_local.generator import local_prompt_version

    name = Path(settings.base_model).expanduser().name if settings.base_model else BUNDLED_DIRNAME
    version = local_prompt_version(settings.qa_pairs_per_chunk, settings.qa_wordings_per_fact)
    return fingerprint(f"local:{name}", version)


def _generate(settings: Settings, reg: Registry, chunks: Sequence, gen, out: GenerationCounts, report=None):
    """Generate for ``chunks`` (the registry's cache first, the settings' spend caps), count it into
    ``out``; returns the result and the ids of the chunks finished (neither failed nor capped)."""
    from tasks.chunking import document_subjects
    from tasks.qa import RegistryCache, generate_for_chunks

    result = generate_for_chunks(
        chunks,
        gen,
        RegistryCache(reg),
        settings.qa_concurrency,
        max_calls=settings.max_llm_calls,
        max_tokens=settings.max_llm_tokens,
        progress=report,
        subjects=document_subjects(reg, sorted({c.doc_id for c in chunks})),
    )
    left = {cid for cid, _ in result.failed} | set(result.skipped_by_cap)
    out.qa_failed = [{"chunk_id": cid, "error": err} for cid, err in result.failed]
    out.qa_rejected = len(result.rejected)
    out.skipped_by_cap = len(result.skipped_by_cap)
    out.llm_calls, out.llm_tokens, out.cache_hits = result.llm_calls, result.tokens, result.cache_hits
    return result, [c.chunk_id for c in chunks if c.chunk_id not in left]


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
    from tasks.qa import generator_fingerprint

    reg = Registry.from_settings(settings)
    chunks = reg.chunks_without_qa()
    if chunk_ids is not None:
        wanted = set(chunk_ids)
        chunks = [c for c in chunks if c.chunk_id in wanted]
    out = QASummary(chunks_pending=len(chunks))
    out.fingerprint = (
        generator_fingerprint(generator) if generator is not None else settings_fingerprint(settings)
    )
    if out.fingerprint is not None:  # None: the settings name no generator (openai without a model)
        out.chunks_on_old_fingerprint = reg.count_chunks_on_old_fingerprint(out.fingerprint)
    if out.chunks_on_old_fingerprint:
        say(
            progress,
            f"qa: {out.chunks_on_old_fingerprint} chunks have pairs from another generation than "
            f"{out.fingerprint} (model, prompt or settings changed); `moral qa regenerate` renews them",
        )
    if not chunks:
        say(progress, "qa: no new chunks, no LLM call")
        return out
    gen = generator or make_generator(settings)
    out.generator = getattr(gen, "name", type(gen).__name__)
    out.fingerprint = generator_fingerprint(gen)
    say(progress, f"qa: generating question/answer pairs for {len(chunks)} chunks with {out.generator}")

    step = max(1, len(chunks) // 20)

    def report(done: int, total: int) -> None:
        # About 20 lines per run: in a flow every line is a log record sent to the Prefect API.
        if done == total or done % step == 0:
            say(progress, f"qa: {done}/{total} chunks")

    result, done = _generate(settings, reg, chunks, gen, out, report)
    records = [replace(p, run_id=run_id) for p in result.pairs]
    # Pairs, done flags and failures in one transaction; a failed chunk is retried by the next run.
    out.qa_generated = reg.record_qa_results(
        records, done, result.failed, run_id=run_id, fingerprint=out.fingerprint
    )
    say(
        progress,
        f"qa: {out.qa_generated} pairs kept, {out.qa_rejected} rejected by validation, {len(out.qa_failed)} chunks "
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
        out.fingerprint = out.fingerprint or p.fingerprint
        # Each shard counts the whole home's chunks on an old generation: the same number.
        out.chunks_on_old_fingerprint = max(out.chunks_on_old_fingerprint, p.chunks_on_old_fingerprint)
        out.qa_generated += p.qa_generated
        out.qa_rejected += p.qa_rejected
        out.qa_failed += p.qa_failed
        out.skipped_by_cap += p.skipped_by_cap
        out.llm_calls += p.llm_calls
        out.llm_tokens += p.llm_tokens
        out.cache_hits += p.cache_hits
    return out


@dataclass
class RegenerateSummary(GenerationCounts):
    fingerprint: str = ""
    dry_run: bool = False
    chunks_on_old_fingerprint: int = 0
    chunks_regenerated: int = 0
    pairs_new: int = 0
    pairs_superseded: int = 0
    pairs_back: int = 0  # pairs an earlier regeneration superseded, made again by this one
    vectors_flagged: int = 0


def regenerate_stage(
    settings: Settings,
    progress: Progress | None = None,
    generator=None,
    doc_ids: Sequence[str] | None = None,
    dry_run: bool = False,
    actor: str | None = "cli",
) -> RegenerateSummary:
    """``moral qa regenerate``: the chunks whose pairs came from another generation than the
    configured one (model, prompt, facts per chunk, wordings per fact, checks) get the pairs the
    configured one makes.  Cached replies are reused where the prompt and model are unchanged
    (no call); the spend caps hold. Per chunk generated anew, in one registry transaction: the new
    pairs added, the chunk's other live pairs ``superseded`` (never trained, replayed or evaluated
    again; excluded pairs stay excluded), the fingerprint recorded; then the index's flags are
    synced. A chunk that fails or is left by a cap keeps its old pairs and fingerprint. The next
    refresh indexes, deduplicates and trains the new pairs. ``doc_ids`` restricts it to those
    documents. The caller holds the refresh lock."""
    from tasks.qa import generator_fingerprint

    reg = Registry.from_settings(settings)
    fp = generator_fingerprint(generator) if generator is not None else settings_fingerprint(settings)
    if fp is None:
        raise ValueError("MORAL_QA_BACKEND=openai needs MORAL_QA_MODEL (the model name at the endpoint)")
    chunks = reg.chunks_on_old_fingerprint(fp, doc_ids=doc_ids)
    out = RegenerateSummary(fingerprint=fp, dry_run=dry_run, chunks_on_old_fingerprint=len(chunks))
    if dry_run or not chunks:
        say(progress, f"qa regenerate: {len(chunks)} chunks on another generation than {fp}")
        return out
    gen = generator or make_generator(settings)
    out.fingerprint = generator_fingerprint(gen)
    say(progress, f"qa regenerate: {len(chunks)} chunks with {out.fingerprint}")
    result, done = _generate(settings, reg, chunks, gen, out)
    renewed = set(done)
    pairs = [p for p in result.pairs if p.chunk_id in renewed]
    out.pairs_new, gone, out.pairs_back = reg.record_regeneration(pairs, done, out.fingerprint, actor=actor)
    out.pairs_superseded = len(gone)
    out.chunks_regenerated = len(done)
    if gone or out.pairs_back:
        from storage.vectors import VectorStore
        from tasks.stages.index import sync_pair_flags

        out.vectors_flagged = sync_pair_flags(reg, VectorStore(settings))
    say(
        progress,
        f"qa regenerate: {out.chunks_regenerated} chunks renewed, {out.pairs_new} new pairs, "
        f"{out.pairs_superseded} superseded, {len(out.qa_failed)} chunks failed, {out.skipped_by_cap} left by a "
        f"spend cap; {out.llm_calls} LLM calls, {out.cache_hits} cache hits",
    )
    return out
