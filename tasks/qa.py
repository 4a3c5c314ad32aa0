"""QA generation: question/answer pairs for each new chunk, with a response cache, bounded concurrency
and a spend cap. Backends: any OpenAI-compatible endpoint (`tasks.qa_openai`) or the embedded local
model (`tasks.qa_local`); both implement the small `QAGenerator` protocol below.

Every pair a backend returns is checked by `validate_pair` against its chunk (grounded answer, a real
question) before it is kept; rejected pairs are reported with their reason.

One file (~470 lines): the backend interface, the pair checks and the cache key are one contract every
backend is held to.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from storage.failpoints import failpoint
from storage.records import QAPair, fact_id_for
from tasks.chunking import SUBJECT_RULE, split_sentences
from tasks.splits import fact_split
from tasks.text import (
    knowledge_text,
    normalize_answer,
    normalize_question,
    sha256_text,
    stable_hash,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Pairs, splits, validation


def new_pair(
    question: str, answer: str, chunk_id: str, doc_id: str, generator: str, prompt_version: str
) -> QAPair:
    """A generated pair as the registry records it: deterministic id, fact id, and its split (per
    fact; the index stage may later hold a far wording out as a paraphrase)."""
    split = fact_split(fact_id_for(doc_id, answer))
    return QAPair.new(chunk_id, doc_id, question, answer, split, generator, prompt_version)  # type: ignore[arg-type]


Q_WORDS = (3, 40)
A_WORDS = (1, 25)


def validate_pair(question: str, answer: str, chunk_text: str) -> str | None:
    """Reason the pair is unusable, or None when it is fine."""
    q, a = question.strip(), answer.strip()
    if not q or not a:
        return "empty question or answer"
    if not Q_WORDS[0] <= len(q.split()) <= Q_WORDS[1] or len(q) > 300:
        return f"question length out of bounds ({len(q.split())} words)"
    if not A_WORDS[0] <= len(a.split()) <= A_WORDS[1] or len(a) > 200:
        return f"answer length out of bounds ({len(a.split())} words)"
    if not q.endswith("?"):
        return "question does not end with '?'"
    a_toks = normalize_answer(a).split()
    if not a_toks:
        return "answer is empty after normalisation"
    c_norm = normalize_answer(chunk_text)
    if len(a_toks) <= 4:
        if f" {' '.join(a_toks)} " not in f" {c_norm} ":
            return "answer not found in chunk"
    else:
        c_set = set(c_norm.split())
        if sum(t in c_set for t in a_toks) / len(a_toks) < 0.8:
            return "answer not grounded in chunk"
    if f" {' '.join(a_toks)} " in f" {normalize_answer(q)} ":
        return "question contains the answer"
    q_toks = set(normalize_question(q).split())
    for sentence in split_sentences(chunk_text):
        s_toks = set(normalize_question(sentence).split())
        if s_toks and len(q_toks & s_toks) / len(q_toks | s_toks) >= 0.9:
            return "question copies a chunk sentence"
    return None


# --------------------------------------------------------------------------------------------------
# Generators, cache, spend cap


@dataclass
class GenerationResult:
    pairs: list[dict[str, str]]
    tokens_in: int = 0
    tokens_out: int = 0
    calls: int = 0
    error: str | None = None
    capped: bool = False  # stopped by the spend cap before finishing (not a failure)


class Budget:
    """Thread-safe spend cap shared by all workers of a run: a call is only made after `acquire()`
    says yes. Tokens are known only after a call, so the token cap refuses a call when the tokens
    spent plus the average cost of a call so far would exceed it."""

    def __init__(self, max_calls: int | None = None, max_tokens: int | None = None):
        self.max_calls, self.max_tokens = max_calls, max_tokens
        self.calls = self.tokens = self._priced_calls = 0
        self._lock = threading.Lock()

    def _refuse(self) -> bool:
        if self.max_calls is not None and self.calls >= self.max_calls:
            return True
        if self.max_tokens is not None:
            avg = self.tokens / self._priced_calls if self._priced_calls else 0
            return self.tokens + avg > self.max_tokens or self.tokens >= self.max_tokens
        return False

    def acquire(self) -> bool:
        with self._lock:
            if self._refuse():
                return False
            self.calls += 1
            return True

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens += n
            self._priced_calls += 1

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self._refuse()


class QAGenerator(Protocol):
    model_id: str  # part of the cache key
    prompt_version: str  # part of the cache key, stored with each pair
    name: str  # provenance label stored with each pair
    batch_size: int  # chunks per generate_many call
    max_concurrency: int  # parallel generate_many calls worth making

    def generate_many(
        self, texts: Sequence[str], budget: Budget | None = None, subjects: Sequence[str | None] | None = None
    ) -> list[GenerationResult]:
        """Pairs per text; ``subjects[i]`` names what the document of ``texts[i]`` is about (or None)."""
        ...


class QACache(Protocol):
    def get(self, key: str) -> dict | None: ...
    def put(self, key: str, response: dict, model: str, prompt_version: str, tokens: int) -> None: ...


class DictCache:
    """In-memory cache with the registry's protocol (for tests and dry runs)."""

    def __init__(self) -> None:
        self.data: dict[str, dict] = {}
        self.puts = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self.data.get(key)

    def put(self, key: str, response: dict, model: str, prompt_version: str, tokens: int) -> None:
        with self._lock:
            self.data[key] = response
            self.puts += 1


class RegistryCache:
    """Adapts a registry's `cache_get` / `cache_put` to the cache protocol."""

    def __init__(self, registry: Any):
        self.registry = registry

    def get(self, key: str) -> dict | None:
        return self.registry.cache_get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return self.registry.cache_get_many(keys)

    def put(self, key: str, response: dict, model: str, prompt_version: str, tokens: int) -> None:
        self.registry.cache_put(key, response, model, prompt_version, tokens)

    def put_many(self, entries: Sequence[tuple[str, dict, str, str, int]]) -> None:
        """Several responses in one registry transaction (one DuckDB connect instead of many)."""
        from storage.records import CacheEntry

        self.registry.cache_put_many([CacheEntry(*e) for e in entries])


class _CacheWriter:
    """Writes responses to the cache from a background thread, batching whatever arrived meanwhile.

    A registry write is a DuckDB connect + commit (~50-150 ms on 2 busy cores); done inline for every
    response it serialised the result loop and cost more than the LLM calls it was saving (48 chunks
    at 200 ms and concurrency 16: 8 s instead of 0.6 s). Here each transaction carries every response
    that arrived during the previous one, so the writer keeps up with any request rate.  ``put``
    returns an event set once the reply is written: the generation loop refills a request slot only
    after its reply is persisted, so a crash (kill -9) pays again only for the requests in flight,
    never for a reply already received.
    """

    def __init__(self, cache: QACache) -> None:
        self.cache = cache
        self._queue: queue.SimpleQueue[tuple[tuple[str, dict, str, str, int], threading.Event] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="qa-cache-writer", daemon=True)
        self.errors: list[str] = []
        self._thread.start()

    def put(self, key: str, response: dict, model: str, prompt_version: str, tokens: int) -> threading.Event:
        written = threading.Event()
        self._queue.put(((key, response, model, prompt_version, tokens), written))
        return written

    def _write(self, items: list[tuple[tuple[str, dict, str, str, int], threading.Event]]) -> None:
        batch = [entry for entry, _ in items]
        try:
            put_many = getattr(self.cache, "put_many", None)
            if put_many is not None:
                put_many(batch)
            else:
                for entry in batch:
                    self.cache.put(*entry)
        except Exception as exc:  # the pairs are still returned; only a rerun would pay again
            log.exception("writing %d LLM responses to the cache failed", len(batch))
            self.errors.append(f"{type(exc).__name__}: {exc}")
        failpoint("qa.cached")
        for _, written in items:
            written.set()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch, stop = [], item is None
            if item is not None:
                batch.append(item)
            while True:  # everything that is already waiting goes into the same transaction
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                self._write(batch)
            if stop:
                return

    def close(self) -> None:
        """Flush what is queued and wait for it (called before the stage records its pairs)."""
        self._queue.put(None)
        self._thread.join()


#: Bump when the checks that keep or reject generated pairs (``validate_pair``,
#: ``pairs_from_response``) change: cached replies stay valid, the chunks' pairs do not.
CHECKS_VERSION = "checks-v1"


def fingerprint(model_id: str, prompt_version: str) -> str:
    """What a chunk's pairs depend on besides its text: the generator's model, its prompt and
    settings (``prompt_version``: facts per chunk, wordings per fact), the checks that keep pairs
    and the rule that names the document's subject in its questions (``SUBJECT_RULE``).
    Recorded per chunk; a chunk on another fingerprint was generated another way (counted by the
    refresh, renewed by ``moral qa regenerate``). The cache key is a part of it, so a chunk whose
    prompt and model did not change is regenerated from the cache without a call."""
    return f"{model_id}|{prompt_version}|{CHECKS_VERSION}|{SUBJECT_RULE}"


def generator_fingerprint(generator: Any) -> str:
    return fingerprint(generator.model_id, generator.prompt_version)


def cache_key(chunk_text: str, model_id: str, prompt_version: str, subject: str | None = None) -> str:
    """Keyed by what the generator is sent: the chunk's text (without instruction-like sentences; not
    its id) and its document's subject, which its questions name: the same paragraph in another
    document about the same subject is free, and a chunk with no planted order and no subject keeps
    the key it always had."""
    parts = (sha256_text(knowledge_text(chunk_text)), model_id, prompt_version)
    return stable_hash(*parts, subject) if subject else stable_hash(*parts)


def cache_keys_ever(
    chunk_text: str, model_id: str, prompt_version: str, subjects: Iterable[str | None] = ()
) -> set[str]:
    """Every key a reply for this chunk may be cached under: without a subject and with each of
    `subjects` (its document's), and, for a chunk with an instruction-like sentence, the raw-text
    key used before those were dropped (a purge deletes them all)."""
    return {
        *(cache_key(chunk_text, model_id, prompt_version, s) for s in {None, *subjects}),
        stable_hash(sha256_text(chunk_text), model_id, prompt_version),
    }


class _ChunkLike(Protocol):
    chunk_id: str
    doc_id: str
    text: str


@dataclass
class QARunResult:
    pairs: list[QAPair] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (chunk_id, error)
    skipped_by_cap: list[str] = field(default_factory=list)
    llm_calls: int = 0
    cache_hits: int = 0
    tokens: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (chunk_id, question, reason)


def pairs_from_response(
    chunk: _ChunkLike,
    raw_pairs: Iterable[dict[str, str]],
    generator: str,
    result: QARunResult,
    prompt_version: str,
) -> None:
    """Validate raw pairs against the chunk; keep the good ones (deduplicated), record the rest."""
    seen: set[str] = set()
    text = knowledge_text(chunk.text)  # an order planted in the chunk is no ground for an answer
    for raw in raw_pairs:
        q, a = str(raw.get("question", "")).strip(), str(raw.get("answer", "")).strip()
        reason = validate_pair(q, a, text)
        if reason is not None and text is not chunk.text and validate_pair(q, a, chunk.text) is None:
            reason = "answer only in an instruction-like sentence"
        if reason is not None:
            result.rejected.append((chunk.chunk_id, q, reason))
            continue
        pair = new_pair(q, a, chunk.chunk_id, chunk.doc_id, generator, prompt_version)
        if pair.qa_id not in seen:
            seen.add(pair.qa_id)
            result.pairs.append(pair)


def generate_for_chunks(
    chunks: Sequence[_ChunkLike],
    generator: QAGenerator,
    cache: QACache | None,
    concurrency: int,
    max_calls: int | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    subjects: Mapping[str, str | None] | None = None,
) -> QARunResult:
    """QA pairs for `chunks`: cache first, then the generator on a bounded pool, caching each
    response as it arrives (a crash loses nothing paid for). When the spend cap is reached no new
    work is submitted; the remaining chunks land in `skipped_by_cap` for the next run. `subjects`:
    per doc id, what the document is about (``tasks.chunking.document_subject``), sent with each of
    its chunks so questions name it."""
    result = QARunResult()
    budget = Budget(max_calls, max_tokens)
    version = generator.prompt_version
    subject_of = {c.doc_id: (subjects or {}).get(c.doc_id) for c in chunks}
    # Identical texts of documents with one subject share one cache key and one generation. The
    # generator reads the chunk without its instruction-like sentences (tasks.text.knowledge_text).
    groups: dict[str, list[_ChunkLike]] = {}
    for chunk in chunks:
        key = cache_key(chunk.text, generator.model_id, version, subject_of[chunk.doc_id])
        groups.setdefault(key, []).append(chunk)
    total, done = len(groups), 0
    pending: list[str] = []
    hits: dict[str, Any] = {}
    if cache is not None:  # one round trip when the cache can do it (the registry: one transaction)
        get_many = getattr(cache, "get_many", None)
        hits = get_many(list(groups)) if get_many else {k: cache.get(k) for k in groups}
    for key, members in groups.items():
        if not knowledge_text(members[0].text).strip():  # nothing but planted orders: nothing to ask
            done += 1
            continue
        hit = hits.get(key)
        if isinstance(hit, dict) and isinstance(hit.get("pairs"), list):
            result.cache_hits += len(members)
            for chunk in members:
                pairs_from_response(chunk, hit["pairs"], generator.name, result, version)
            done += 1
        else:
            pending.append(key)
    if progress and done:
        progress(done, total)

    size = max(1, int(generator.batch_size))
    batches = [pending[i : i + size] for i in range(0, len(pending), size)]
    workers = max(1, min(concurrency, generator.max_concurrency, len(batches) or 1))

    def skip(keys: Iterable[str]) -> None:
        for key in keys:
            result.skipped_by_cap.extend(c.chunk_id for c in groups[key])

    writer = _CacheWriter(cache) if cache is not None and pending else None
    try:
        _run_pool(
            generator,
            groups,
            subject_of,
            batches,
            workers,
            budget,
            writer,
            result,
            skip,
            done,
            total,
            progress,
        )
    finally:
        if writer is not None:
            writer.close()
    result.tokens = result.tokens_in + result.tokens_out
    return result


def _run_pool(
    generator: QAGenerator,
    groups: dict[str, list[_ChunkLike]],
    subject_of: Mapping[str, str | None],
    batches: list[list[str]],
    workers: int,
    budget: Budget,
    writer: _CacheWriter | None,
    result: QARunResult,
    skip: Callable[[Iterable[str]], None],
    done: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Keep `workers` generate_many calls in flight; handle each reply as it arrives."""
    version = generator.prompt_version
    queue_ = iter(batches)
    in_flight: dict[Future, list[str]] = {}
    capped = False

    def fill(pool: ThreadPoolExecutor) -> None:
        nonlocal capped
        while not capped and len(in_flight) < workers:
            batch = next(queue_, None)
            if batch is None:
                return
            if budget.exhausted:
                capped = True
                skip(batch)
                return
            texts = [knowledge_text(groups[k][0].text) for k in batch]
            subjects = [subject_of[groups[k][0].doc_id] for k in batch]
            in_flight[pool.submit(generator.generate_many, texts, budget, subjects)] = batch

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qa") as pool:
        while True:
            fill(pool)
            if not in_flight:
                break
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            replies = [(fut, in_flight.pop(fut)) for fut in finished]
            # The replies go to the cache writer first; this thread validates them while they are
            # written, and the freed slots are refilled (at the top of the loop) only once they are
            # persisted: a crash never loses a reply that was paid for.
            persisted: list[threading.Event] = []
            for fut, batch in replies:
                try:
                    outs = fut.result()
                except Exception as exc:  # a generator bug must not lose the other chunks
                    log.exception("QA generation batch failed")
                    outs = [GenerationResult([], error=f"{type(exc).__name__}: {exc}") for _ in batch]
                for key, out in zip(batch, outs, strict=True):
                    result.llm_calls += out.calls
                    result.tokens_in += out.tokens_in
                    result.tokens_out += out.tokens_out
                    members = groups[key]
                    if out.capped:
                        skip([key])
                    elif out.error is not None:
                        result.failed.extend((c.chunk_id, out.error) for c in members)
                    else:
                        if writer is not None:
                            persisted.append(
                                writer.put(
                                    key,
                                    {"pairs": out.pairs},
                                    generator.model_id,
                                    version,
                                    out.tokens_in + out.tokens_out,
                                )
                            )
                        for chunk in members:
                            pairs_from_response(chunk, out.pairs, generator.name, result, version)
                    done += 1
                if progress:
                    progress(done, total)
            for written in persisted:
                written.wait()
        for batch in queue_:  # left over after the cap
            skip(batch)
