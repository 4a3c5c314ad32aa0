"""bench/knowledge.py --quick as a subprocess on the tiny model and the loopback LLM endpoint: the
real stages run, the questions are asked through `moral serve`, one JSON object comes out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_run_prints_one_json_object(tiny_model_dir, tmp_path):
    from bench.knowledge import BASE_OPEN_PROMPTS
    from tests.tasks.llm_server import LLMServer

    server = LLMServer()
    server.state.wordings = 3  # a fact keeps two trained wordings beside its paraphrase question
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAL_") or k == "MORAL_MODEL_CACHE"}
    sets = {
        "MORAL_BASE_MODEL": str(tiny_model_dir),
        "MORAL_QA_BACKEND": "openai",
        "MORAL_QA_BASE_URL": server.base_url,
        "MORAL_QA_API_KEY": "sk-test-not-a-secret",
        "MORAL_QA_MODEL": "loopback-qa",
        "MORAL_NUM_EXPERTS": "2",
        "MORAL_EVAL_MAX_NEW_TOKENS": "4",
    }
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "knowledge.py"), "--quick", "--arms", "moral,lora",
             "--work", str(tmp_path / "work"), *[f"--set={k}={v}" for k, v in sets.items()]],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        # The base model's prompts alone, on the finished arm's home (its base model and index).
        again = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "knowledge.py"), "--quick", "--base-prompts", str(tmp_path / "work" / "moral-seed0")],
            cwd=ROOT, env={**env, "MORAL_BASE_MODEL": str(tiny_model_dir), "MORAL_EVAL_MAX_NEW_TOKENS": "4"},
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out["arms"]) == {"moral", "lora"} and out["base"] is not None
    moral = out["arms"]["moral"][0]
    [first] = moral["refreshes"]
    assert (
        first["qa_generated"] > 0 and first["version"] == 1 and first["decision"] in ("promoted", "rejected")
    )
    assert {"paraphrase", "world_knowledge", "drift", "gate_checks"} <= set(first["pipeline"])
    tune = moral["report"]["closed"]["tune"]
    assert tune["all"]["n"] > 0 and 0.0 <= tune["all"]["value"] <= 1.0 and len(tune["all"]["ci"]) == 2
    assert {"trained", "document_only", "confabulation"} <= set(tune)
    assert out["base"]["open"]["tune"]["all"]["n"] == tune["all"]["n"]
    best = out["base"]["open_best_prompt"]  # the base model's best open-book prompt, chosen on tune
    assert set(best["by_prompt"]) == set(BASE_OPEN_PROMPTS) and best["chosen_on_tune"] in BASE_OPEN_PROMPTS
    assert best["by_prompt"]["default"] == out["base"]["open"]  # the default prompt's answers, reused
    top = max(v["tune"]["all"]["value"] for v in best["by_prompt"].values())
    assert best["scores"]["tune"]["all"]["value"] == top
    assert moral["similarity"]["n"] > 0 and "median" in moral["similarity"]["cosine"]
    assert set(moral["seconds"]) == {"qa_index", "train", "evaluate"}
    assert out["arms"]["lora"][0]["refreshes"][0]["version"] == 1

    assert again.returncode == 0, again.stderr[-3000:]
    alone = json.loads(again.stdout)
    assert set(alone["by_prompt"]) == set(BASE_OPEN_PROMPTS) and alone["left_out_edited"] >= 0
    assert alone["by_prompt"]["default"]["tune"]["all"]["n"] == tune["all"]["n"] - alone["left_out_edited"]
    assert alone["scores"] == alone["by_prompt"][alone["chosen_on_tune"]]


def test_parts_select_the_questions_of_the_parts_refreshed():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench.knowledge import load_corpus, selected

    questions = load_corpus()["questions"]
    one, two, every = (selected(questions, n, quick=False) for n in (1, 2, 3))
    assert one and {q["part"] for q in one} == {1} and {q["split"] for q in one} == {"tune", "report"}
    assert {q["part"] for q in two} == {1, 2} and every == questions
    quick = selected(questions, 3, quick=True)
    assert quick and {(q["part"], q["split"]) for q in quick} == {(1, "tune")}
