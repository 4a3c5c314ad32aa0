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
