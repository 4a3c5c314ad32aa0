"""Embeddings and Chroma collections, on a real PersistentClient and (integration) a real server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage.settings import Settings
from storage.vectors import (
    CHUNKS,
    QA_PAIRS,
    Embedder,
    VectorStore,
    VectorStoreError,
    bundled_embedding_model_path,
    clean_metadata,
)


def _unit_vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_bundled_model_path_exists() -> None:
    assert (Path(bundled_embedding_model_path()) / "config.json").is_file()


def test_embedder_normalised_and_loaded_once(embedder: Embedder) -> None:
    vectors = embedder.encode(
        ["The drone carries 2 kg.", "Payload of the drone is two kilograms.", "I like tea."]
    )
    assert vectors.shape == (3, embedder.dimension) == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # paraphrase is closer than noise
    assert embedder.encode([]).shape == (0, 384)
    assert Embedder().model is embedder.model  # module-level cache: one load per process


def test_upsert_is_idempotent_and_query_finds_nearest(settings: Settings, embedder: Embedder) -> None:
    store = VectorStore(settings, embedder)
    texts = [
        "The Quillfeather Q7 drone has a maximum payload of 2.5 kg.",
        "Our office is closed on public holidays.",
        "The Q7 battery lasts 40 minutes.",
        "Refunds are processed within 14 days.",
    ]
    ids = [f"c{i}" for i in range(len(texts))]
    metas = [{"doc_id": "d1", "status": "active", "page": i, "none": None} for i in range(len(texts))]
    assert store.upsert(CHUNKS, ids, texts, metas) == 4
    assert store.upsert(CHUNKS, ids, texts, metas) == 4
    assert store.count(CHUNKS) == 4 and store.count(QA_PAIRS) == 0
    hits = store.query(CHUNKS, ["How heavy a load can the Q7 carry?", "When do I get my money back?"], k=2)
    assert [h[0].id for h in hits] == ["c0", "c3"]
    top = hits[0][0]
    assert top.text == texts[0] and top.metadata == {"doc_id": "d1", "status": "active", "page": 0}
    query_vec = embedder.encode(["How heavy a load can the Q7 carry?"])[0]
    cosine = float(query_vec @ embedder.encode([texts[0]])[0])
    assert top.similarity == pytest.approx(cosine, abs=1e-4) and top.distance == pytest.approx(
        1 - cosine, abs=1e-4
    )
    assert store.query(QA_PAIRS, "anything", k=3) == [[]]  # empty collection
    # The collection is cosine and carries no embedding function (Chroma's default needs the network).
    config = store.collection(CHUNKS).configuration
    assert config["hnsw"]["space"] == "cosine" and config.get("embedding_function") is None
    # A second store on the same data home sees the same data.
    assert VectorStore(settings, embedder).count(CHUNKS) == 4


def test_batches_over_the_max_batch_size(settings: Settings) -> None:
    store = VectorStore(settings, max_batch_size=3)
    assert store.max_batch_size == 3
    vectors = _unit_vectors(10)
    ids = [f"q{i}" for i in range(10)]
    # A repeated id within one call: the last one wins instead of Chroma refusing the batch.
    assert (
        store.upsert(
            QA_PAIRS, ids + ["q0"], [f"t{i}" for i in range(11)], embeddings=np.vstack([vectors, vectors[:1]])
        )
        == 10
    )
    assert store.count(QA_PAIRS) == 10
    assert store.get(QA_PAIRS, ids=["q0"])[0].text == "t10"
    records = store.get(QA_PAIRS, ids=ids, include_embeddings=True)
    assert len(records) == 10
    by_id = {r.id: r.embedding for r in records}
    np.testing.assert_allclose(by_id["q4"], vectors[4], atol=1e-6)
    hits = store.query(QA_PAIRS, vectors[:7], k=1)  # 7 queries, 3 per call
    assert [h[0].id for h in hits] == ids[:7]
    assert hits[2][0].similarity == pytest.approx(1.0, abs=1e-5)
    store.delete(QA_PAIRS, ids=ids[:8])
    assert sorted(store.ids(QA_PAIRS)) == ["q8", "q9"]
    with pytest.raises(VectorStoreError, match="ids or a where"):
        store.delete(QA_PAIRS)
    with pytest.raises(VectorStoreError, match="same length"):
        store.upsert(QA_PAIRS, ["a"], ["x", "y"])


def test_retired_records_are_filtered_by_where(settings: Settings) -> None:
    store = VectorStore(settings, max_batch_size=2)
    vectors = _unit_vectors(6, seed=1)
    metas = [{"doc_id": "d1" if i < 3 else "d2", "status": "active"} for i in range(6)]
    store.upsert(CHUNKS, [f"c{i}" for i in range(6)], [f"t{i}" for i in range(6)], metas, embeddings=vectors)
    assert (
        store.set_metadata(CHUNKS, None, {"status": "retired", "reason": None}, where={"doc_id": "d1"}) == 3
    )
    assert store.set_metadata(CHUNKS, ["c4", "missing"], {"status": "retired"}) == 1
    active = {"status": "active"}
    assert store.count(CHUNKS) == 6 and store.count(CHUNKS, where=active) == 2
    hits = store.query(CHUNKS, vectors[:1], k=6, where=active)[0]
    assert {h.id for h in hits} == {"c3", "c5"}
    assert store.get(CHUNKS, ids=["c0"])[0].metadata == {"doc_id": "d1", "status": "retired"}  # merged
    store.delete(CHUNKS, where={"status": "retired"})
    assert sorted(store.ids(CHUNKS)) == ["c3", "c5"]


def test_clean_metadata() -> None:
    assert clean_metadata({"a": None, "b": np.int64(3), "c": True, "d": 1.5}) == {"b": 3, "c": True, "d": 1.5}
    assert clean_metadata({"a": None}) is None and clean_metadata(None) is None
    with pytest.raises(VectorStoreError, match="must be str"):
        clean_metadata({"a": [1, 2]})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_gives_a_clear_error(settings: Settings) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(VectorStoreError, match="cannot reach the Chroma server"):
        VectorStore(settings.model_copy(update={"chroma_url": url}))


CHROMA_BIN = Path(sys.executable).with_name("chroma")


@pytest.mark.integration
@pytest.mark.skipif(not CHROMA_BIN.exists() and not shutil.which("chroma"), reason="no `chroma` binary")
def test_http_client_against_a_real_server(settings: Settings, tmp_path: Path) -> None:
    import httpx

    port = _free_port()
    binary = str(CHROMA_BIN) if CHROMA_BIN.exists() else str(shutil.which("chroma"))
    log = open(tmp_path / "chroma.log", "wb")
    server = subprocess.Popen(
        [binary, "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "chroma.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "chroma server did not start within 30 s"
            time.sleep(0.2)
        remote = settings.model_copy(update={"chroma_url": f"http://127.0.0.1:{port}"})
        store = VectorStore(remote, prefix="home1_", max_batch_size=4)
        vectors = _unit_vectors(9, seed=2)
        ids = [f"c{i}" for i in range(9)]
        store.upsert(CHUNKS, ids, [f"t{i}" for i in range(9)], [{"status": "active"}] * 9, embeddings=vectors)
        store.upsert(CHUNKS, ids, [f"t{i}" for i in range(9)], [{"status": "active"}] * 9, embeddings=vectors)
        assert store.count(CHUNKS) == 9
        assert store.client.get_collection("home1_chunks").count() == 9  # the prefix isolates data homes
        assert store.set_metadata(CHUNKS, ids[:5], {"status": "retired"}) == 5
        hits = store.query(CHUNKS, vectors[:2], k=9, where={"status": "active"})
        assert [len(h) for h in hits] == [4, 4] and hits[0][0].id not in ids[:5]
        assert store.query(CHUNKS, vectors[5:6], k=1)[0][0].id == "c5"
    finally:
        server.kill()
        server.wait(10)
        log.close()
