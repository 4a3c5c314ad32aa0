"""`moral eval --json`, `moral eval --rerun` and `moral report` on a data home made by a tiny-model refresh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from flows.params import RefreshParams
from flows.refresh import run_refresh
from storage.registry import Registry
from storage.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def tiny_home(settings, monkeypatch, tiny_model_dir, llm_endpoint, prefect_harness, source_dir):
    """A data home after one refresh with the tiny Llama (QA from the loopback endpoint)."""
    for key, value in {
        "MORAL_BASE_MODEL": str(tiny_model_dir), "MORAL_QA_BACKEND": "openai",
        "MORAL_QA_BASE_URL": llm_endpoint.base_url, "MORAL_QA_API_KEY": "sk-test-not-a-secret",
        "MORAL_QA_MODEL": "loopback-qa", "MORAL_HOLDOUT_SIZE": "4", "MORAL_EPOCHS": "1",
        "MORAL_NUM_EXPERTS": "4", "MORAL_EVAL_MAX_NEW_TOKENS": "4", "MORAL_FIVEL_SIZE": "3",
        "MORAL_RECALL_SAMPLE": "4", "MORAL_DRIFT_SIZE": "4", "MORAL_GATE_MIN_N": "2",
        "MORAL_GATE_OVERRIDE": "tests: a tiny model on tiny suites",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    llm_endpoint.state.wordings = 2  # a far second wording per fact: paraphrase questions to hold out
    get_settings.cache_clear()
    summary = run_refresh(RefreshParams(source=str(source_dir)), quiet=True)
    assert summary["status"] == "completed" and summary["version"] == "v1"
    yield get_settings(), summary
    get_settings.cache_clear()


def test_eval_json_report_and_rerun(tiny_home, source_dir, capsys):
    settings, summary = tiny_home
    assert main(["eval", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["version"] for r in rows} == {"v1"}
    assert set(rows[0]) == {"version", "model", "suite", "mode", "metric", "value", "n", "ci_low", "ci_high"}
    assert {r["model"] for r in rows} == {"base", "candidate"}  # no champion before v1
    keys = {(r["suite"], r["mode"]) for r in rows}
    # Every document suite closed- and open-book, the 5L suites, the world holdout closed-book only.
    assert {("paraphrase", "closed"), ("paraphrase", "open"), ("trained_recall", "closed"),
            ("trained_recall", "open"), ("world_knowledge", "closed"), ("drift", "closed")} <= keys  # fmt: skip
    assert ("world_knowledge", "open") not in keys
    assert {"faith", "filter", "refusal"} & {s for s, _ in keys}
    metrics = {r["metric"] for r in rows}
    assert {"ra_strict", "ra", "ra_em", "ra_f1", "nll", "qr"} <= metrics
    for r in rows:
        assert r["n"] > 0
        if r["value"] is not None:
            assert r["ci_low"] <= r["value"] + 1e-9 and r["value"] <= r["ci_high"] + 1e-9

    # The gate's decision is explained in `moral versions --json` and in the registry.
    assert main(["versions", "--json"]) == 0
    [v1] = json.loads(capsys.readouterr().out)
    assert v1["decision_reasons"] == summary["reasons"] and v1["metrics"]["gate"]["checks"]

    # Plots beside the version, from the training log persisted at train time.
    log = json.loads((settings.home / "training" / "v1.json").read_text())
    assert log["losses"] and log["expert_stats"]

    assert main(["report"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(settings.home / "reports" / "v1.html")
    page = (settings.home / "reports" / "v1.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # loss curve and expert load, inlined
    assert "<h2>Knowledge by document</h2>" in page and "reference closed" in page
    assert (
        "paraphrase" in page
        and "world_knowledge" in page
        and "drift" in page
        and summary["reasons"][0][:20] in page
    )
    assert (settings.home / "reports" / "v1" / "loss.png").stat().st_size > 0

    # --rerun re-evaluates through the evaluate stage: same rows again, older ones kept.
    reg = Registry(settings.registry_path)
    before = len(reg.evaluations(version=1))
    assert main(["eval", "--rerun", "--version", "v1", "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert len(reg.evaluations(version=1)) == 2 * before
    assert [(r["model"], r["suite"], r["mode"], r["metric"], r["value"]) for r in rerun] == [
        (r["model"], r["suite"], r["mode"], r["metric"], r["value"]) for r in rows
    ]  # greedy decoding: a rerun reproduces every number

    # What the evaluate stage saved is enough for the knowledge per document (no champion: base).
    assert main(["eval", "--by-document", "--json"]) == 0
    by_doc = json.loads(capsys.readouterr().out)
    assert by_doc and {r["reference"] for r in by_doc} == {"base"}
    assert {Path(r["document"]).name for r in by_doc} <= {p.name for p in source_dir.iterdir()}
    assert [r["document"] for r in by_doc] == sorted(r["document"] for r in by_doc)
    for r in by_doc:
        assert r["facts"] > 0 and 0 <= r["closed"]["candidate"] <= r["facts"]
        assert len(r["learned"]) + len(r["forgot"]) <= r["facts"]
    assert main(["eval", "--by-document"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# v1\n") and "| document | facts | reference closed |" in out

    # `moral compare`: plain LoRA trained on v1's pairs and example mix, all three on v1's suites.
    assert main(["compare", "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["version"] == "v1" and cmp["train_pairs"] > 0 and Path(cmp["lora_artifact"]).is_dir()
    assert cmp["rows"] and all({"base", "moral", "lora"} <= set(r) for r in cmp["rows"])
    assert json.loads((settings.home / "compare" / "v1.json").read_text())["rows"] == cmp["rows"]


def test_eval_on_an_empty_home_says_so(settings, capsys):
    assert main(["eval"]) == 0
    assert "no evaluations yet" in capsys.readouterr().out
    assert main(["eval", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["report"]) == 1
    assert "run `moral refresh`" in capsys.readouterr().err
