"""Knowledge per document from a hand-built saved evaluation (no model): `knowledge_by_document`,
its markdown and HTML, and `moral eval --by-document` on a real DuckDB registry."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from storage.home import scores_path
from storage.registry import Registry
from tasks.plots import write_html_report
from tasks.report import (
    KNOWLEDGE_NOT_RECORDED,
    evaluation_markdown,
    knowledge_by_document,
    knowledge_markdown,
)

DOCS = {
    "fa1": "docs/a.md",
    "fa2": "docs/a.md",
    "fa3": "docs/a.md",
    "fa4": "docs/a.md",
    "fb1": "docs/b.md",
    "fb2": "docs/b.md",
}


def saved_from(questions: list[tuple], docs: dict[str, str], **extra) -> dict:
    """A saved evaluation as `evaluate_stage` writes it, from (suite key, fact, question, gold,
    {model: (ra_strict, answer)}) per question; items, scores and predictions stay aligned."""
    scores: dict = {}
    items: dict = {}
    predictions: dict = {}
    for key, fact, question, gold, by_model in questions:
        items.setdefault(key, []).append({"fact_id": fact, "question": question, "gold": gold})
        for model, (strict, answer) in by_model.items():
            metrics = scores.setdefault(key, {}).setdefault(model, {"ra_strict": [], "ra": []})
            metrics["ra_strict"].append(float(strict))
            metrics["ra"].append(float(strict))
            predictions.setdefault(key, {}).setdefault(model, []).append(answer)
    return {
        "version": 1,
        "has_champion": any("champion" in by for by in scores.values()),
        "champion_version": None,
        "sizes": {k: len(v) for k, v in items.items()},
        "means": {},
        "scores": scores,
        "items": items,
        "predictions": predictions,
        "fact_docs": {f: {"doc_id": f"doc-{p}", "path": p} for f, p in docs.items()},
        **extra,
    }


def q(key: str, fact: str, n: int, base: int, champion: int | None, candidate: int) -> tuple:
    """Question ``n`` of a fact, the ra_strict of each model; each answer names its model."""
    marks = {"base": base, "candidate": candidate}
    if champion is not None:
        marks["champion"] = champion
    return (
        key,
        fact,
        f"question {n} about {fact}?",
        f"gold {fact}",
        {m: (v, f"{m} says {fact}/{n}") for m, v in marks.items()},
    )


#: Against the champion on docs/a.md the candidate learns fa1 and forgets fa2; fa3 both know, fa4
#: neither (closed-book; the trained_recall suite, where the candidate knows fa4, does not count).
#: The base model knows nothing closed-book: had it been taken as the reference, fa3 would be
#: "learned" and nothing "forgotten".  docs/b.md: fb1 (retention) known to both, fb2 (unseen) to
#: neither closed-book, but to the candidate open-book.
CHAMPION_RUN = [
    q("paraphrase", "fa1", 1, base=0, champion=0, candidate=1),
    q("paraphrase", "fa2", 1, base=0, champion=1, candidate=0),
    q("paraphrase", "fa3", 1, base=0, champion=1, candidate=1),
    q("paraphrase", "fa4", 1, base=0, champion=0, candidate=0),
    q("unseen", "fb2", 1, base=0, champion=0, candidate=0),
    q("retention", "fb1", 1, base=0, champion=1, candidate=1),
    q("trained_recall", "fa4", 2, base=0, champion=0, candidate=1),
    q("paraphrase:open", "fa1", 1, base=1, champion=1, candidate=1),
    q("paraphrase:open", "fa2", 1, base=1, champion=1, candidate=1),
    q("paraphrase:open", "fa3", 1, base=0, champion=1, candidate=1),
    q("paraphrase:open", "fa4", 1, base=0, champion=0, candidate=0),
    q("unseen:open", "fb2", 1, base=0, champion=0, candidate=1),
    q("retention:open", "fb1", 1, base=0, champion=1, candidate=1),
    q("trained_recall:open", "fa4", 2, base=1, champion=1, candidate=1),
]


def diff(fact: str, reference: str, n: int = 1) -> dict:
    return {
        "fact_id": fact,
        "question": f"question {n} about {fact}?",
        "gold": f"gold {fact}",
        "reference_answer": f"{reference} says {fact}/{n}",
        "candidate_answer": f"candidate says {fact}/{n}",
    }


def test_learned_and_forgotten_facts_against_the_champion():
    rows = knowledge_by_document(saved_from(CHAMPION_RUN, DOCS))
    assert rows == [
        {
            "document": "docs/a.md",
            "facts": 4,
            "reference": "champion",
            "closed": {"reference": 2, "candidate": 2},
            "open": {"reference": 3, "candidate": 3},
            "learned": [diff("fa1", "champion")],
            "forgot": [diff("fa2", "champion")],
        },
        {
            "document": "docs/b.md",
            "facts": 2,
            "reference": "champion",
            "closed": {"reference": 1, "candidate": 1},
            "open": {"reference": 1, "candidate": 2},
            "learned": [],
            "forgot": [],
        },
    ]


def test_base_is_the_reference_without_a_champion():
    no_champion = [
        (key, fact, question, gold, {m: v for m, v in by.items() if m != "champion"})
        for key, fact, question, gold, by in CHAMPION_RUN
    ]
    [a, b] = knowledge_by_document(saved_from(no_champion, DOCS))
    assert a["reference"] == b["reference"] == "base"
    assert a["closed"] == {"reference": 0, "candidate": 2} and a["open"] == {"reference": 2, "candidate": 3}
    assert a["learned"] == [diff("fa1", "base"), diff("fa3", "base")] and a["forgot"] == []
    assert b["closed"] == {"reference": 0, "candidate": 1} and b["learned"] == [diff("fb1", "base")]


def test_a_fact_is_answered_when_at_least_half_its_questions_are():
    questions = [
        q("paraphrase", "early", 1, base=0, champion=None, candidate=0),  # first seen, last sorted
        q("paraphrase", "two", 1, base=0, champion=None, candidate=0),
        q("paraphrase", "two", 2, base=0, champion=None, candidate=1),  # 1 of 2: answered
        q("paraphrase", "three", 1, base=0, champion=None, candidate=1),
        q("paraphrase", "three", 2, base=0, champion=None, candidate=0),
        q("paraphrase", "three", 3, base=0, champion=None, candidate=0),  # 1 of 3: not answered
    ]
    row, other = knowledge_by_document(
        saved_from(questions, {"early": "z.md", "two": "doc.md", "three": "doc.md"})
    )
    assert (row["document"], other["document"]) == ("doc.md", "z.md")  # sorted by path
    assert row["facts"] == 2
    assert row["closed"] == {"reference": 0, "candidate": 1}
    # the diff shows the fact's first question (answered wrongly here), not the one it got right
    assert row["learned"] == [diff("two", "base", n=1)] and row["forgot"] == []


def test_markdown_table_and_diff_lists():
    rows = knowledge_by_document(saved_from(CHAMPION_RUN, DOCS))
    md = knowledge_markdown(rows)
    assert (
        "| document | facts | reference closed | candidate closed | reference open | candidate open "
        "| learned | forgot |"
    ) in md
    assert "| docs/a.md | 4 | 2 | 2 | 3 | 3 | 1 | 1 |" in md
    assert "| docs/b.md | 2 | 1 | 1 | 1 | 2 | 0 | 0 |" in md
    assert "Reference: champion." in md
    learned, forgot = md.index("Learned (1):"), md.index("Forgot (1):")
    assert md.index("### docs/a.md") < learned < forgot and "### docs/b.md" not in md
    line = "- question 1 about fa1? — gold: gold fa1; champion: champion says fa1/1; candidate: candidate says fa1/1"
    assert line in md[learned:forgot]
    assert "question 1 about fa2?" in md[forgot:] and "question 1 about fa2?" not in md[:forgot]


def test_markdown_lists_at_most_five_facts_each():
    questions = [q("paraphrase", f"f{i}", 1, base=0, champion=None, candidate=1) for i in range(7)]
    md = knowledge_markdown(knowledge_by_document(saved_from(questions, {f"f{i}": "d.md" for i in range(7)})))
    assert "Learned (7):" in md and md.count("\n- question 1 about") == 5 and "- … and 2 more" in md


def test_an_old_file_without_items_is_not_recorded():
    old = saved_from(CHAMPION_RUN, DOCS)
    for key in ("items", "predictions", "fact_docs"):
        del old[key]
    assert knowledge_by_document(old) == []


# --------------------------------------------------------------------------------------------------
# on a registry: the CLI, the markdown report and the HTML report


@pytest.fixture
def registry_home(settings):
    """Two versions in a real registry; only v2 has a saved evaluation (CHAMPION_RUN)."""
    reg = Registry.from_settings(settings)
    run_id = reg.start_run({})
    versions = [
        reg.create_version(run_id=run_id, params={}, artifact_uri="/nowhere", artifact_sha256="0" * 64)
        for _ in range(2)
    ]
    assert versions == [1, 2]
    write_saved(settings, 2, saved_from(CHAMPION_RUN, DOCS))
    return settings, reg


def write_saved(settings, version: int, saved: dict) -> None:
    path = scores_path(settings, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))


def test_cli_by_document_prints_the_table_and_json_rows(registry_home, capsys):
    settings, _ = registry_home
    assert main(["eval", "--by-document"]) == 0  # the latest version: v2
    out = capsys.readouterr().out
    assert out.startswith("# v2\n")
    assert "| docs/a.md | 4 | 2 | 2 | 3 | 3 | 1 | 1 |" in out and "Learned (1):" in out

    assert main(["eval", "--by-document", "--version", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == knowledge_by_document(saved_from(CHAMPION_RUN, DOCS))
    assert [r["document"] for r in rows] == ["docs/a.md", "docs/b.md"]
    assert rows[0]["learned"][0]["fact_id"] == "fa1" and rows[0]["forgot"][0]["fact_id"] == "fa2"


def test_cli_by_document_without_a_saved_evaluation_says_so(registry_home, capsys):
    assert main(["eval", "--by-document", "--version", "v1"]) == 1
    err = capsys.readouterr().err
    assert "v1 has no saved evaluation" in err and "moral eval --rerun --version v1" in err


def test_cli_by_document_on_an_empty_home_says_so(settings, capsys):
    assert main(["eval", "--by-document"]) == 1
    assert "run `moral refresh`" in capsys.readouterr().err


def test_old_evaluation_says_knowledge_was_not_recorded(registry_home, capsys):
    settings, reg = registry_home
    write_saved(settings, 1, {"scores": {}, "has_champion": False, "sizes": {}, "means": {}})
    assert main(["eval", "--by-document", "--version", "v1"]) == 0
    out = capsys.readouterr().out
    assert KNOWLEDGE_NOT_RECORDED in out and "| document |" not in out
    assert main(["eval", "--by-document", "--version", "v1", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and KNOWLEDGE_NOT_RECORDED in captured.err
    assert KNOWLEDGE_NOT_RECORDED in evaluation_markdown(reg, 1, settings)
    assert (
        "not recorded for this version"
        in write_html_report(Registry.from_settings(settings), settings, 1).read_text()
    )


def test_markdown_and_html_reports_show_knowledge_by_document(registry_home):
    settings, reg = registry_home
    md = evaluation_markdown(reg, 2, settings)
    assert "## Knowledge by document" in md and "| docs/a.md | 4 | 2 | 2 | 3 | 3 | 1 | 1 |" in md
    assert "## Knowledge by document" not in evaluation_markdown(reg, 2)  # no settings: no saved file
    page = write_html_report(Registry.from_settings(settings), settings, 2).read_text()
    assert "<h2>Knowledge by document</h2>" in page
    assert "<td>docs/a.md</td><td>4</td><td>2</td><td>2</td><td>3</td><td>3</td><td>1</td><td>1</td>" in page
    assert "question 1 about fa1?" in page and "question 1 about fa2?" in page
