"""bench/ingest.py runs end to end (``--quick``) and prints one JSON object with the agreed keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"qa_wall_over_ideal", "index_over_raw_encode", "rerun_llm_calls", "rerun_seconds", "dedup_seconds"}


@pytest.mark.slow  # a fresh process: imports torch, Chroma and openai and loads the embedding model
def test_quick_run_prints_one_json_object(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MORAL_HOME": str(tmp_path / "unused-home")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--quick"],
        cwd=tmp_path,  # the script finds the project itself
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert KEYS <= set(out) and out["quick"] is True
    assert out["rerun_llm_calls"] == 0  # a rerun on unchanged input never calls the LLM
    assert out["qa_wall_over_ideal"] > 0 and out["index_over_raw_encode"] > 0 and out["dedup_seconds"] > 0
    assert out["dedup_found"] == out["dedup_planted"]  # every planted duplicate found, nothing else
    assert not (tmp_path / "unused-home").exists()  # the bench works in its own temporary data homes
