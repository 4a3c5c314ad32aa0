"""Fixtures for the stage tests: a loopback LLM server and the bundled embedding model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

from tests.tasks.llm_server import LLMServer  # noqa: E402


@pytest.fixture
def llm_server():
    server = LLMServer().start()
    yield server
    server.stop()
