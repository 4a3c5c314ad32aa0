"""Domain retention across successive refreshes from different folders: the third version's
evaluation suites hold the first document set's held-out pairs (issue: lifelong acceptance)."""

from __future__ import annotations

from pathlib import Path

from storage.records import QAPair
from storage.registry import Registry
from tests.artifacts import adapter_files

SETS = {
    "set1": ("q7.md", "The Quillfeather Q7 carries 2.4 kg and flies for 42 minutes.", "Q7"),
    "set2": ("heron.md", "The Heron API returns sightings grouped by lake and by season.", "Heron"),
    "set3": ("tidewell.md", "Tidewell harbour opens its lock gates at 05:40 every weekday.", "Tidewell"),
}


def test_third_version_is_evaluated_for_retention_of_the_first_set(settings, embedder, tmp_path: Path):
    from tasks.stages.evaluate import build_suites
    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage

    s = settings.model_copy(update={"fivel_size": 0, "holdout_size": 0})
    reg = Registry.from_settings(s)
    eval_by_set: dict[str, set[str]] = {}
    versions: dict[str, int] = {}
    for n, (name, (filename, text, topic)) in enumerate(SETS.items(), start=1):
        folder = tmp_path / name  # a folder per set: a later scan must not retire earlier sets
        folder.mkdir()
        (folder / filename).write_text(text + "\n")
        ingest_stage(s, folder, f"run-{n}")
        chunk = next(c for c in reg.chunks() if topic in c.text)
        train = [QAPair.new(chunk.chunk_id, chunk.doc_id, f"{topic} fact {i}?", f"{topic} {i}", "train") for i in range(2)]  # fmt: skip
        # a far wording of trained fact 0: a paraphrase question, the kind retention is measured on
        held = [QAPair.new(chunk.chunk_id, chunk.doc_id, f"Which number goes with {topic} in record zero?", f"{topic} 0", "eval")]  # fmt: skip
        reg.add_qa_pairs(train + held, run_id=f"run-{n}")
        index_stage(s, f"run-{n}")
        eval_by_set[name] = {p.question for p in held}
        versions[name] = reg.create_version(
            run_id=f"run-{n}", **adapter_files(tmp_path / "adapters"),
            trained_pairs={p.qa_id: "delta" for p in train},
        )  # fmt: skip
        reg.decide_version(versions[name], "promoted", ["test"], actor="test")

    suites = {(x.name, x.mode): {i.question for i in x.items} for x in build_suites(s, reg, versions["set3"])}
    assert suites[("paraphrase", "closed")] == eval_by_set["set3"]
    # Retention: held-out pairs of the sets earlier versions shipped, closed- and open-book.
    assert suites[("retention", "closed")] == eval_by_set["set1"] | eval_by_set["set2"]
    assert suites[("retention", "open")] == eval_by_set["set1"] | eval_by_set["set2"]
    assert all(Path(d.path).exists() for d in reg.documents(status="active")) and len(reg.documents()) == 3
