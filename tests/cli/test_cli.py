"""The `moral` CLI through its entry point: exit codes and output."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from storage.registry import Registry
from storage.settings import get_settings
from tests.artifacts import adapter_files


def test_versions_json_lists_versions_with_champion_flag(settings, capsys):
    assert main(["versions", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    reg = Registry(settings.registry_path)
    v1 = reg.create_version(run_id="r1", **adapter_files(settings.home / "adapters"))
    reg.decide_version(v1, "promoted", ["ok: test"], actor="test")
    reg.create_version(run_id="r2", parent_version=v1)
    assert main(["versions", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["status"], r["is_champion"]) for r in rows] == [
        ("v1", "promoted", True),
        ("v2", "candidate", False),
    ]
    assert rows[0]["decision_reasons"] == ["ok: test"] and rows[1]["parent_version"] == "v1"
    assert {"created_at", "metrics"} <= set(rows[0])

    assert main(["versions"]) == 0
    text = capsys.readouterr().out
    assert "* " in text and "v1" in text and "ok: test" in text


def test_ask_answers_with_the_base_model_when_there_is_no_champion(
    settings, monkeypatch, tiny_model_dir, capsys
):
    monkeypatch.setenv("MORAL_BASE_MODEL", str(tiny_model_dir))
    get_settings.cache_clear()
    assert main(["ask", "What is the payload?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] is None and isinstance(out["answer"], str) and out["open_book"] is False


def test_ask_with_an_unknown_version_is_a_clear_error(settings, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setenv("MORAL_BASE_MODEL", str(tiny_model_dir))
    get_settings.cache_clear()
    assert main(["ask", "Q?", "--version", "v7"]) == 1
    assert "error:" in capsys.readouterr().err


def test_ask_questions_file_scores_base_and_champion_side_by_side(
    settings, monkeypatch, tiny_model_dir, tmp_path, capsys
):
    """`moral ask --questions` (the end of `make demo`): each hand-written question asked of both
    models, scored by strict recall; with nothing trained both columns are the base model's."""
    monkeypatch.setenv("MORAL_BASE_MODEL", str(tiny_model_dir))
    get_settings.cache_clear()
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        json.dumps({"question": "What colour is the Zorbl gem?", "answer": "Teal", "aliases": []})
        + "\n"
        + json.dumps({"question": "Who founded Quillfeather?", "answer": "Ada Voss"})
        + "\n"
    )
    assert main(["ask", "--questions", str(qfile), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] is None and len(out["questions"]) == 2
    for row in out["questions"]:
        assert row["base"] == row["champion"]
        assert isinstance(row["base_correct"], bool) and row["nearest_trained"] is None
    assert main(["ask", "--questions", str(qfile)]) == 0
    text = capsys.readouterr().out
    assert "base model vs" in text and "right: base" in text
    with pytest.raises(SystemExit, match="give a question"):
        main(["ask"])
