"""Fixtures for flow tests: the Prefect test harness (one temporary API for the session), a tiny
base model saved as a real local HF directory, and the loopback LLM endpoint."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tasks.llm_server import LLMServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "docs"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a byte-level tokenizer, saved like any local causal-LM directory."""
    from tests.moe.tiny import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-base")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def llm_endpoint() -> Iterator[LLMServer]:
    server = LLMServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    """The example corpus plus one corrupt PDF, in a folder of its own."""
    src = tmp_path / "docs"
    shutil.copytree(EXAMPLES, src)
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ntruncated")
    return src
