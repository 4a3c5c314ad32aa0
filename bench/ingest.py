"""Ingestion-side throughput: QA generation, indexing, a rerun on unchanged input, and dedup at scale.

Prints ONE JSON object:

- ``qa_wall_over_ideal``: ``tasks.stages.qa.qa_stage`` exactly as the flow calls it (generator built
  from the settings: the OpenAI-compatible backend) for N chunks against the loopback server of
  ``tests/tasks/llm_server.py`` answering each call after 200 ms, at concurrency 16; wall time over
  the ideal ``N / 16 * 0.2 s``.
- ``index_over_raw_encode``: ``tasks.stages.index.index_stage`` on M new chunks (registry read, presence
  check, embedding, Chroma upserts) over the bundled model's raw ``SentenceTransformer.encode`` of the
  same texts in the same process.
- ``rerun_llm_calls`` / ``rerun_seconds``: ingest + QA + index again on the unchanged source folder.
- ``dedup_seconds``: ``tasks.dedup.dedup_pairs`` for K new pairs against a Chroma index of K pairs.
  The embeddings are synthetic unit vectors with planted near-duplicates (computing 2K real ones would
  take minutes and is not what is measured); ``dedup_found`` / ``dedup_planted`` check it still works.

    .venv/bin/python bench/ingest.py            # N=200, M=5,000, K=20,000 (a few minutes on 2 cores)
    .venv/bin/python bench/ingest.py --quick    # smoke run in well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from storage.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()

import numpy as np  # noqa: E402

LATENCY_S = 0.2
CONCURRENCY = 16
SUBJECTS = [
    "Quillfeather",
    "Heron",
    "Marlin",
    "Osprey",
    "Kestrel",
    "Puffin",
    "Lynx",
    "Otter",
    "Bison",
    "Ibis",
]
THINGS = ["drone", "sensor", "gateway", "scanner", "relay", "router", "beacon", "camera", "charger", "valve"]
PLACES = ["Oslo", "Lyon", "Porto", "Gdansk", "Tartu", "Bergen", "Turku", "Ghent", "Graz", "Cork"]


def fact_text(rng: random.Random, i: int, sentences: int = 3) -> str:
    """A chunk-sized paragraph of distinct facts (unique numbers, so no two chunks are equal)."""
    out = []
    for s in range(sentences):
        subject, thing, place = rng.choice(SUBJECTS), rng.choice(THINGS), rng.choice(PLACES)
        out.append(
            f"The {subject} {thing} model {i}-{s} was assembled in {place} during week {rng.randint(1, 52)} "
            f"and weighs exactly {rng.randint(100, 9999)} grams according to the latest inspection report."
        )
    return " ".join(out)


def make_settings(home: Path, **overrides):
    from storage.settings import Settings

    settings = Settings(home=home, **overrides)
    settings.ensure_dirs()
    return settings


# --------------------------------------------------------------------------------------------------
class ServerProcess:
    """tests/tasks/llm_server.py in its own process, like a real endpoint: in this process its request
    handling would compete with the client for the GIL and the benchmark would time both."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.tasks.llm_server", "--latency", str(latency)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.stop()
            raise RuntimeError("the loopback LLM server did not start")

    @property
    def calls(self) -> int:
        return int(self.stats()["calls"])

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def bench_qa_and_rerun(workdir: Path, n_chunks: int) -> dict:
    """QA stage wall time at concurrency 16, then a rerun of ingest+QA+index on unchanged input."""
    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage
    from tasks.stages.qa import qa_stage

    rng = random.Random(0)
    src = workdir / "qa-docs"
    src.mkdir()
    for i in range(n_chunks):  # one chunk per document: the paragraph fits in chunk_tokens
        (src / f"doc-{i:04d}.txt").write_text(fact_text(rng, i, sentences=2) + "\n")
    server = ServerProcess(LATENCY_S)
    try:
        settings = make_settings(
            workdir / "qa-home",
            qa_backend="openai",
            qa_base_url=server.base_url,
            qa_api_key="sk-bench-not-a-secret",
            qa_model="loopback",
            qa_concurrency=CONCURRENCY,
        )
        start = time.perf_counter()
        ingested = ingest_stage(settings, src, "bench-1")
        ingest_seconds = time.perf_counter() - start
        assert ingested.chunks_added == n_chunks, ingested.chunks_added
        start = time.perf_counter()
        qa = qa_stage(settings, "bench-1")
        qa_wall = time.perf_counter() - start
        assert qa.llm_calls == n_chunks and not qa.qa_failed, (qa.llm_calls, qa.qa_failed[:2])
        index_stage(settings, "bench-1")

        calls = server.calls
        start = time.perf_counter()
        again = ingest_stage(settings, src, "bench-2")
        rerun_qa = qa_stage(settings, "bench-2")
        rerun_index = index_stage(settings, "bench-2")
        rerun_seconds = time.perf_counter() - start
        changed = (
            again.chunks_added + rerun_qa.qa_generated + rerun_index.qa_indexed + rerun_index.chunks_indexed
        )
        assert changed == 0, "a rerun on unchanged input changed something"
        ideal = n_chunks / CONCURRENCY * LATENCY_S
        return {
            "qa_chunks": n_chunks,
            "qa_wall_s": round(qa_wall, 3),
            "qa_ideal_s": round(ideal, 3),
            "qa_wall_over_ideal": round(qa_wall / ideal, 3),
            "qa_pairs": qa.qa_generated,
            "qa_max_in_flight": server.stats()["max_in_flight"],
            "ingest_seconds": round(ingest_seconds, 3),
            "rerun_llm_calls": server.calls - calls,
            "rerun_seconds": round(rerun_seconds, 3),
        }
    finally:
        server.stop()


def bench_index(workdir: Path, n_chunks: int) -> dict:
    """index_stage on n new chunks vs the raw encode of the same texts."""
    from storage.records import Chunk
    from storage.registry import Registry
    from storage.vectors import CHUNKS, Embedder, VectorStore
    from tasks.stages.index import index_stage

    rng = random.Random(1)
    settings = make_settings(workdir / "index-home")
    reg = Registry.from_settings(settings)
    doc_ids = [f"{d:064x}" for d in range(max(1, n_chunks // 25))]
    for doc_id in doc_ids:
        reg.upsert_document(doc_id, f"/bench/{doc_id[-6:]}.txt", kind="text", run_id="bench")
    chunks = []
    for i in range(n_chunks):
        text = fact_text(rng, i, sentences=3)
        chunks.append(Chunk.new(doc_ids[i % len(doc_ids)], i, text, 1, len(text.split()), run_id="bench"))
    reg.add_chunks(chunks, run_id="bench")
    texts = [c.text for c in reg.chunks()]

    embedder = Embedder.from_settings(settings)
    model = embedder.model  # loaded (and warmed) before either timing
    model.encode(texts[:64])
    start = time.perf_counter()
    model.encode(texts)  # the model's own defaults: what "raw encode" means
    raw = time.perf_counter() - start

    start = time.perf_counter()
    out = index_stage(settings, "bench")
    wall = time.perf_counter() - start
    assert out.chunks_indexed == n_chunks, out.chunks_indexed
    assert VectorStore(settings).count(CHUNKS) == n_chunks
    return {
        "index_chunks": n_chunks,
        "index_wall_s": round(wall, 3),
        "raw_encode_s": round(raw, 3),
        "index_over_raw_encode": round(wall / raw, 3),
    }


def bench_dedup(workdir: Path, n: int, threshold: float = 0.95) -> dict:
    """dedup_pairs for n new pairs against an index of n pairs (synthetic embeddings, see above)."""
    from storage.vectors import QA_PAIRS, VectorStore
    from tasks.dedup import dedup_pairs
    from tasks.index import index_qa
    from tasks.qa import QAPair, new_pair

    rng = np.random.default_rng(2)
    dim = 384

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def pairs(prefix: str, count: int) -> list[QAPair]:
        return [
            new_pair(
                f"What does the {prefix} record number {i} say about item {i * 7 + 3}?",
                f"value {prefix} {i}",
                f"{prefix}-chunk-{i // 3}",
                f"{prefix}-doc-{i // 30}",
                "bench",
                "bench",
            )
            for i in range(count)
        ]

    old = pairs("old", n)
    old_emb = unit(rng.standard_normal((n, dim)))  # (n, 384): random directions are ~orthogonal
    new = pairs("new", n)
    new_emb = unit(rng.standard_normal((n, dim)))
    # Plant duplicates: 5% of the new pairs near an indexed pair (same answer), 5% near another new one.
    planted = n // 20
    for j in range(planted):
        new[j] = new_pair(f"Which value does old record {j} hold?", old[j].answer, new[j].chunk_id,
                        new[j].doc_id, "bench", "bench")  # fmt: skip
        new_emb[j] = unit(old_emb[j : j + 1] + 0.05 * rng.standard_normal((1, dim)) / np.sqrt(dim))[0]
    for j in range(planted, 2 * planted):
        # a later new pair from another document with the same answer (within one document the same
        # answer is the same fact, and two wordings of one fact are variants, not duplicates)
        src = j + planted
        new[src] = new_pair(f"Which value is stored in new record {j}?", new[j].answer, f"other-chunk-{j}",
                          f"other-doc-{j}", "bench", "bench")  # fmt: skip
        new_emb[src] = unit(new_emb[j : j + 1] + 0.05 * rng.standard_normal((1, dim)) / np.sqrt(dim))[0]

    settings = make_settings(workdir / "dedup-home")
    store = VectorStore(settings)
    start = time.perf_counter()
    index_qa(store, old, old_emb, "bench")
    build = time.perf_counter() - start
    assert store.count(QA_PAIRS) == n

    start = time.perf_counter()
    result = dedup_pairs(new, new_emb, store, threshold)
    seconds = time.perf_counter() - start
    return {
        "dedup_new_pairs": n,
        "dedup_index_size": n,
        "dedup_seconds": round(seconds, 3),
        "dedup_index_build_s": round(build, 3),
        "dedup_planted": 2 * planted,
        "dedup_found": len(result.duplicates),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    args = parser.parse_args(argv)
    qa_chunks, index_chunks, dedup_pairs_n = (32, 64, 500) if args.quick else (200, 5_000, 20_000)

    out: dict = {"quick": args.quick, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="moral-bench-ingest-") as tmp:
        work = Path(tmp)
        out.update(bench_qa_and_rerun(work, qa_chunks))
        out.update(bench_index(work, index_chunks))
        out.update(bench_dedup(work, dedup_pairs_n))
    out["targets"] = {"qa_wall_over_ideal": 1.3, "index_over_raw_encode": 1.3, "rerun_llm_calls": 0}
    out["targets_met"] = (
        out["qa_wall_over_ideal"] <= 1.3
        and out["index_over_raw_encode"] <= 1.3
        and out["rerun_llm_calls"] == 0
    )
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
