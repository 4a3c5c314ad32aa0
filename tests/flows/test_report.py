"""Reports and approval on a hand-built registry (no model): the markdown and table artifacts, the
plots and HTML report, and `require_approval` with and without a Prefect server to resume from."""

from __future__ import annotations

import json

import pytest

from flows.artifacts import artifact_key
from flows.refresh import await_approval
from storage.home import scores_path
from storage.records import Evaluation
from storage.registry import Registry
from tasks.evaluate import EvalOutput, Suite, evaluation_rows
from tasks.plots import expert_load_per_layer, save_plots, write_html_report
from tasks.report import REGISTRY_TABLE_KEY, evaluation_markdown

# Candidate clearly better on paraphrase questions, no forgetting: the gate would promote (with
# gate_min_n lowered to the 4 questions here).
SCORES = {
    "paraphrase": {
        "base": {"ra_strict": [0.0, 0.0, 0.0, 0.0], "ra": [0.0, 0.0, 1.0, 0.0]},
        "candidate": {"ra_strict": [1.0, 1.0, 1.0, 0.0], "ra": [1.0, 1.0, 1.0, 0.0]},
    },
    "world_knowledge": {
        "base": {"ra": [0.0, 1.0], "nll": [4.0, 4.2]},
        "candidate": {"ra": [0.0, 1.0], "nll": [4.0, 4.2]},
    },
    "drift": {"base": {"nll": [1.0, 1.2]}, "candidate": {"nll": [1.0, 1.2]}},
}
# The paraphrase questions' facts, answers and documents, as `evaluate_stage` saves them: the
# candidate knows f1 (2 questions) and f2, not f3; the base model none of them.
ITEMS = [("f1", "Who wrote the guide?"), ("f1", "The guide's author?"), ("f2", "When?"), ("f3", "Where?")]
KNOWLEDGE = {
    "items": {"paraphrase": [{"fact_id": f, "question": text, "gold": f"gold {f}"} for f, text in ITEMS]},
    "predictions": {
        "paraphrase": {
            "base": ["no idea"] * 4,
            "candidate": ["gold f1", "gold f1", "gold f2", "elsewhere"],
        }
    },
    "fact_docs": {
        "f1": {"doc_id": "d1", "path": "docs/guide.md"},
        "f2": {"doc_id": "d1", "path": "docs/guide.md"},
        "f3": {"doc_id": "d2", "path": "docs/faq.md"},
    },
}
STATS = {
    "model.layers.0.mlp": {"load": [1.5, 0.5], "importance": [0.7, 0.3], "tokens": [10.0]},
    "model.layers.1.mlp.gate_proj": {"load": [0.4, 1.6], "importance": [0.2, 0.8], "tokens": [10.0]},
    "model.layers.1.mlp.up_proj": {"load": [0.6, 1.4], "importance": [0.3, 0.7], "tokens": [10.0]},
}


@pytest.fixture
def home(settings):
    settings = settings.model_copy(update={"gate_min_n": 4})
    reg = Registry.from_settings(settings)
    run_id = reg.start_run({})
    version = reg.create_version(run_id=run_id, params={}, artifact_uri="/nowhere", artifact_sha256="0" * 64)
    suites = [
        Suite("paraphrase", []),
        Suite("world_knowledge", [], nll=True),
        Suite("drift", [], kind="drift"),
    ]
    rows = evaluation_rows(EvalOutput(scores=SCORES), suites, seed=0)
    reg.record_evaluations([Evaluation(version=version, run_id=run_id, **r) for r in rows])
    path = scores_path(settings, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"scores": SCORES, "has_champion": False, "sizes": {}, "means": {}, **KNOWLEDGE})
    )
    log = settings.home / "training" / f"v{version}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(
        json.dumps({"losses": [2.0, 1.5, 1.1, 0.9], "aux_losses": [0.1] * 4, "expert_stats": STATS})
    )
    return settings, reg, version


def test_expert_load_is_averaged_per_layer():
    layers, loads = expert_load_per_layer(STATS)
    assert layers == [0, 1]
    assert loads == [pytest.approx([1.5, 0.5]), pytest.approx([0.5, 1.5])]


def test_markdown_plots_and_html_report(home):
    settings, reg, version = home
    md = evaluation_markdown(reg, version)
    assert "| paraphrase | closed | ra_strict |" in md and "| paraphrase | closed | ra |" in md
    assert "0.750 [" in md and "n=4" in md and "| base | candidate |" in md
    plots = save_plots(settings, version)
    assert set(plots) == {"loss", "expert_load"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots.values())
    page = write_html_report(Registry.from_settings(settings), settings).read_text()
    assert page.count("data:image/png;base64,") == 2 and "world_knowledge" in page
    assert "no decision recorded yet" in page


def test_require_approval_without_a_server_leaves_a_candidate_awaiting_approval(home):
    settings, reg, version = home
    reasons = await_approval(settings, reg, reg.start_run({}), version)
    assert reasons[0].startswith("awaiting approval: this run is not attached to a Prefect server")
    assert any(r.startswith("gate: ok: paraphrase strict recall") for r in reasons)
    v = reg.get_version(version)
    assert v.status == "candidate" and v.decision_reasons == reasons
    assert "awaiting approval" in evaluation_markdown(reg, version)


def test_require_approval_pauses_in_a_flow_run_and_times_out(home, prefect_harness):
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.artifacts import publish_artifacts

    settings, reg, version = home
    settings = settings.model_copy(update={"approval_timeout_s": 2})

    @flow
    def approve_then_report() -> list[str] | None:
        reasons = await_approval(settings, reg, reg.start_run({}), version)
        publish_artifacts(settings, version)
        return reasons

    reasons = approve_then_report()
    assert reasons[0] == "awaiting approval: nobody resumed the run within 2 s"
    assert reg.get_version(version).status == "candidate"
    assert [e.kind for e in reg.events(kind="version.awaiting_approval")] == ["version.awaiting_approval"] * 2
    markdown = Artifact.get(artifact_key(version))
    assert markdown is not None and "awaiting approval" in markdown.data and "n=4" in markdown.data
    # The plots inlined as images (no paths on the worker), and the knowledge per document.
    assert markdown.data.count("](data:image/png;base64,") == 2 and "Plots:" not in markdown.data
    assert "![loss](data:image/png;base64,iVBORw0KGgo" in markdown.data  # a PNG's signature, base64
    assert "| docs/faq.md | 1 | 0 | 0 | 0 | 0 | 0 | 0 |" in markdown.data
    assert "| docs/guide.md | 2 | 0 | 2 | 0 | 0 | 2 | 0 |" in markdown.data
    assert "Who wrote the guide? — gold: gold f1; base: no idea; candidate: gold f1" in markdown.data
    table = Artifact.get(REGISTRY_TABLE_KEY)
    assert table is not None and "v1" in str(table.data)
