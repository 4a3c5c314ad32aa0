"""``moral qa``, ``moral quarantine`` and ``moral docs`` through the CLI entry point, against a data
home populated by the real ingest, QA (loopback OpenAI-compatible server) and index stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fpdf import FPDF

from cli.main import main
from storage.registry import Registry
from storage.settings import Settings
from storage.vectors import CHUNKS, QA_PAIRS, VectorStore
from tasks.qa import cache_key
from tasks.qa_openai import OpenAIQAGenerator
from tasks.stages.index import index_stage
from tasks.stages.ingest import ingest_stage
from tasks.stages.qa import qa_stage

DRONES = (
    "The Quillfeather Q7 drone weighs 1.8 kg and carries a payload of 2.4 kg over long distances. "
    "Its battery lasts 42 minutes in calm weather conditions near the coast. "
    "Harbor Labs assembled the first units in a small factory outside Oslo in 2024."
)
HERONS = (
    "The grey heron nests in tall trees close to shallow lakes and slow rivers. "
    "Adult herons stand about one metre tall and weigh close to two kilograms. "
    "Young herons leave the nest roughly fifty days after they have hatched."
)


def two_page_pdf() -> bytes:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for text in (
        "The Heron API returns sighting records grouped by lake and by season.",
        "Each sighting record carries a timestamp, a lake name and an observer id.",
    ):
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def json_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def home(settings: Settings, llm_endpoint, tmp_path: Path) -> tuple[Settings, Path]:
    """Two good documents, a broken PDF, an empty text file and a PDF over the page limit, taken
    through ingest, QA and index."""
    src = tmp_path / "docs"
    src.mkdir()
    (src / "drones.md").write_text("# Drones\n\n" + DRONES)
    (src / "herons.txt").write_text(HERONS)
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ntruncated")
    (src / "empty.txt").write_text("  \n")
    (src / "api.pdf").write_bytes(two_page_pdf())
    settings = settings.model_copy(update={"max_pdf_pages": 1})
    ingest_stage(settings, src, "run-1")
    gen = OpenAIQAGenerator(llm_endpoint.base_url, "sk-test", "loopback", timeout_s=5)
    qa_stage(settings, "run-1", generator=gen)
    index_stage(settings, "run-1")
    return settings, src


def test_qa_list_filters_by_document_split_and_status(home, capsys):
    settings, src = home
    rows = json_out(capsys, ["qa", "list", "--json"])
    assert rows and {r["path"] for r in rows} == {str(src / "drones.md"), str(src / "herons.txt")}
    assert {"qa_id", "question", "answer", "split", "status", "duplicate_of", "chunk_id"} <= set(rows[0])
    drones = json_out(capsys, ["qa", "list", "--doc", str(src / "drones.md"), "--json"])
    assert drones and all(r["path"].endswith("drones.md") for r in drones)
    assert len(drones) < len(rows)
    # A path suffix is enough when it names one document.
    assert json_out(capsys, ["qa", "list", "--doc", "drones.md", "--json"]) == drones
    for split in ("train", "eval"):
        subset = json_out(capsys, ["qa", "list", "--split", split, "--json"])
        assert {r["split"] for r in subset} <= {split}
        assert len(subset) == sum(r["split"] == split for r in rows)

    assert main(["qa", "list"]) == 0
    text = capsys.readouterr().out
    assert rows[0]["qa_id"][:12] in text and rows[0]["question"] in text

    assert main(["qa", "list", "--doc", str(src / "nope.md")]) == 1
    assert "no document recorded" in capsys.readouterr().err


def test_qa_exclude_by_prefix_keeps_the_pair_out_of_training(home, capsys, tiny_model_dir):
    settings, _ = home
    from tasks.stages.train import train_stage

    reg = Registry(settings.registry_path)
    train = reg.qa_pairs(split="train")
    assert len(train) >= 2
    victim = train[0]
    before = reg.counts()["qa_pairs"]

    # An unknown id is refused and excludes nothing, even next to a valid one.
    assert main(["qa", "exclude", victim.qa_id[:10], "ffffffffffff"]) == 1
    assert "no QA pair ffffffffffff" in capsys.readouterr().err
    assert reg.counts()["qa_pairs"] == before

    out = json_out(capsys, ["qa", "exclude", victim.qa_id[:10], "--reason", "wrong answer", "--json"])
    assert out == {"excluded": 1, "qa_ids": [victim.qa_id]}
    [row] = [r for r in json_out(capsys, ["qa", "list", "--status", "excluded", "--json"])]
    assert row["qa_id"] == victim.qa_id
    [ev] = reg.events(kind="qa.excluded")
    assert ev.actor == "cli" and ev.detail["reason"] == "wrong answer"

    # The index agrees: the pair is excluded there too, so a new pair asking the same is not dropped
    # as its duplicate (it would never be trained).
    from storage.records import QAPair

    store = VectorStore(settings)
    [rec] = store.get(QA_PAIRS, ids=[victim.qa_id])
    assert rec.metadata["status"] == "excluded"
    again = QAPair.new(victim.chunk_id, victim.doc_id, "Tell me: " + victim.question, victim.answer, "train")
    assert again.qa_id != victim.qa_id
    reg.add_qa_pairs([again], run_id="run-2")
    assert index_stage(settings, "run-2").qa_indexed == 1
    assert reg.qa_pairs(ids=[again.qa_id])[0].status == "active"
    # A home from before: the index still had it active; the next index stage excludes it there.
    store.set_metadata(QA_PAIRS, [victim.qa_id], {"status": "active"})
    assert index_stage(settings, "run-3").excluded_vectors == 1
    assert store.get(QA_PAIRS, ids=[victim.qa_id])[0].metadata["status"] == "excluded"

    tiny = settings.model_copy(
        update={"base_model": str(tiny_model_dir), "epochs": 1, "num_experts": 2, "rank": 2, "batch_size": 4}
    )
    summary = train_stage(tiny, "run-2")
    assert summary.version is not None
    trained = reg.trained_pairs(summary.version)
    assert victim.qa_id not in trained
    assert {p.qa_id for p in train[1:]} <= set(trained)


def test_qa_regenerate_renews_old_chunks_and_the_index_agrees(home, capsys, llm_endpoint, monkeypatch):
    """After the generation settings change, the refresh's QA stage counts the chunks on the old
    fingerprint; `moral qa regenerate` renews them (under the refresh lock), supersedes the pairs
    the new settings no longer make in the registry and in the index, and the next index stage
    indexes the new ones and leaves the superseded ones out of dedup."""
    from storage.lock import refresh_lock

    settings, _ = home
    reg = Registry(settings.registry_path)
    before = {p.qa_id for p in reg.qa_pairs()}
    for key, value in {
        "MORAL_QA_BACKEND": "openai",
        "MORAL_QA_BASE_URL": llm_endpoint.base_url,
        "MORAL_QA_MODEL": "loopback",
        "MORAL_QA_PAIRS_PER_CHUNK": "1",
    }.items():
        monkeypatch.setenv(key, value)
    from storage.settings import get_settings

    get_settings.cache_clear()
    changed = get_settings()
    chunks = len(reg.chunks())
    assert qa_stage(changed, "run-2").chunks_on_old_fingerprint == chunks

    out = json_out(capsys, ["qa", "regenerate", "--dry-run", "--json"])
    assert out["chunks_on_old_fingerprint"] == chunks and out["chunks_regenerated"] == 0
    one_doc = json_out(capsys, ["qa", "regenerate", "--dry-run", "--doc", "drones.md", "--json"])
    assert 0 < one_doc["chunks_on_old_fingerprint"] < chunks
    with refresh_lock(settings.home, purpose="test"):
        assert main(["qa", "regenerate"]) == 1  # never beside a refresh
    llm_endpoint.state.pairs_per_call = 1
    try:
        out = json_out(capsys, ["qa", "regenerate", "--json"])
    finally:
        llm_endpoint.state.pairs_per_call = 3
    assert out["chunks_regenerated"] == chunks and out["pairs_superseded"] > 0
    superseded = {p.qa_id for p in reg.qa_pairs(status="superseded")}
    assert superseded and superseded <= before
    store = VectorStore(settings)
    flagged = {r.id for r in store.get(QA_PAIRS, ids=sorted(superseded))}
    assert flagged and all(
        r.metadata["status"] == "superseded" for r in store.get(QA_PAIRS, ids=sorted(flagged))
    )
    assert qa_stage(changed, "run-3").chunks_on_old_fingerprint == 0
    rows = json_out(capsys, ["qa", "list", "--json"])
    assert not superseded & {r["qa_id"] for r in rows}  # the default list leaves them out
    assert {
        r["qa_id"] for r in json_out(capsys, ["qa", "list", "--status", "superseded", "--json"])
    } == superseded
    # A crash after the registry commit: the index still has them active; the index stage mends it
    # before it deduplicates, so a new wording of a superseded pair is not dropped as its duplicate.
    from storage.records import QAPair

    store.set_metadata(QA_PAIRS, sorted(flagged), {"status": "active"})
    gone = reg.qa_pairs(ids=[sorted(flagged)[0]], status=None)[0]
    again = QAPair.new(gone.chunk_id, gone.doc_id, "Tell me: " + gone.question, gone.answer, "train")
    reg.add_qa_pairs([again], run_id="run-4")
    assert index_stage(changed, "run-4").superseded_vectors == len(flagged)
    assert all(r.metadata["status"] == "superseded" for r in store.get(QA_PAIRS, ids=sorted(flagged)))
    assert reg.qa_pairs(ids=[again.qa_id], status=None)[0].status == "active"
    assert main(["qa", "regenerate"]) == 0
    assert "nothing to regenerate" in capsys.readouterr().out
    get_settings.cache_clear()


def test_quarantine_list_and_retry_on_the_next_run(home, capsys):
    settings, src = home
    rows = json_out(capsys, ["quarantine", "list", "--json"])
    reasons = {Path(r["path"]).name: r["reason"] for r in rows}
    assert set(reasons) == {"broken.pdf", "empty.txt", "api.pdf"}
    assert "corrupt PDF" in reasons["broken.pdf"] and reasons["empty.txt"] == "empty document"
    assert reasons["api.pdf"] == "too many pages: 2 > 1"
    assert main(["quarantine", "list"]) == 0
    assert "too many pages" in capsys.readouterr().out

    # Unchanged quarantined bytes are not read again by a plain rerun ...
    again = ingest_stage(settings, src, "run-2")
    assert not again.documents_new and len(again.documents_quarantined) == 3

    # ... but after `retry` (here: once the page limit was raised) the next run reads them.
    assert main(["quarantine", "retry", str(src / "nope.pdf")]) == 1
    assert "not quarantined" in capsys.readouterr().err
    out = json_out(capsys, ["quarantine", "retry", "--json"])
    assert sorted(Path(p).name for p in out["retried"]) == ["api.pdf", "broken.pdf", "empty.txt"]
    assert json_out(capsys, ["quarantine", "list", "--json"]) == []

    raised = settings.model_copy(update={"max_pdf_pages": 10})
    retry = ingest_stage(raised, src, "run-3")
    assert retry.documents_new == [str(src / "api.pdf")] and retry.chunks_added >= 1
    still = {Path(q["path"]).name for q in retry.documents_quarantined}
    assert still == {"broken.pdf", "empty.txt"}  # still bad: quarantined again, with their reasons
    rows = json_out(capsys, ["quarantine", "list", "--json"])
    assert {Path(r["path"]).name for r in rows} == {"broken.pdf", "empty.txt"}
    history = json_out(capsys, ["quarantine", "list", "--all", "--json"])
    assert sum(r["resolved"] for r in history) == 3


def test_docs_purge_removes_everything_of_one_document(home, capsys):
    settings, src = home
    reg = Registry(settings.registry_path)
    store = VectorStore(settings)
    drones = next(d for d in reg.documents() if d.path.endswith("drones.md"))
    herons = next(d for d in reg.documents() if d.path.endswith("herons.txt"))
    texts = [c.text for c in reg.chunks(doc_id=drones.doc_id)]
    keys = [
        cache_key(t, "loopback", OpenAIQAGenerator("http://x", "k", "loopback").prompt_version) for t in texts
    ]
    assert len(reg.cache_get_many(keys)) == len(texts) > 0
    where = {"doc_id": drones.doc_id}
    assert store.count(CHUNKS, where) > 0 and store.count(QA_PAIRS, where) > 0
    herons_before = (len(reg.qa_pairs(doc_id=herons.doc_id)), store.count(CHUNKS, {"doc_id": herons.doc_id}))

    (src / "drones.md").unlink()  # removed from the source first: no warning expected
    out = json_out(capsys, ["docs", "purge", str(src / "drones.md"), "--json"])
    assert out["documents"] == 1 and out["chunks"] == len(texts) and out["qa_pairs"] > 0
    assert out["llm_cache"] == len(texts) and out["vectors"] > 0 and out["still_in_source"] == []

    assert reg.document_by_sha(drones.doc_id) is None
    assert reg.chunks(doc_id=drones.doc_id, status=None) == []
    assert reg.qa_pairs(doc_id=drones.doc_id, status=None) == []
    assert reg.cache_get_many(keys) == {}
    fresh = VectorStore(settings)
    assert fresh.count(CHUNKS, where) == 0 and fresh.count(QA_PAIRS, where) == 0
    [ev] = reg.events(kind="document.purged")
    assert ev.actor == "cli" and ev.detail["doc_ids"] == [drones.doc_id] and ev.detail["chunks"] == len(texts)
    # The other document is untouched.
    assert (len(reg.qa_pairs(doc_id=herons.doc_id)), fresh.count(CHUNKS, {"doc_id": herons.doc_id})) == (
        herons_before
    )

    assert main(["docs", "purge", str(src / "drones.md")]) == 1
    assert "no document recorded" in capsys.readouterr().err


def test_purging_a_file_still_in_the_source_warns(home, capsys):
    settings, src = home
    assert main(["docs", "purge", str(src / "herons.txt")]) == 0
    captured = capsys.readouterr()
    assert "purged" in captured.out and "QA pairs" in captured.out
    assert "still exists" in captured.err


def test_read_commands_on_an_empty_data_home(settings, capsys):
    assert json_out(capsys, ["qa", "list", "--json"]) == []
    assert json_out(capsys, ["quarantine", "list", "--json"]) == []
    assert main(["docs", "purge", "x.md"]) == 1
    assert "run `moral refresh` first" in capsys.readouterr().err


def test_purge_keeps_the_reply_a_document_with_the_same_subject_reads_and_drops_its_own(
    settings: Settings, llm_endpoint, tmp_path: Path, capsys
):
    """Replies are cached under the chunk's text *and* its document's subject. Two documents with
    one title share their first chunk: purging one keeps that reply (the other reads it under the
    same subject) and deletes the replies only the purged document's chunks were keyed by."""
    from tasks.chunking import document_subjects
    from tasks.qa import cache_keys_ever

    head = (
        "Lumenvale Orbit 5.2 release notes\n\n"
        "Lumenvale Orbit is the ticket-routing service of Corvid Lane and runs in four regions. "
        "The default retention period for closed tickets is now 540 days in every region. "
        "Search indexes are rebuilt every night at two in the morning local time. "
        "Agents can now merge duplicate tickets from the queue view without a supervisor. "
    )
    tails = {
        "a.md": "The routing engine was rewritten in a memory-safe language during the spring of this "
        "year so that a malformed ticket can no longer stop the whole queue for every customer.",
        "b.md": "Audit exports now include the agent who closed each ticket and the reason they gave, "
        "so a compliance reviewer can trace every decision without opening the ticket itself.",
    }
    src = tmp_path / "docs"
    src.mkdir()
    for name, tail in tails.items():
        (src / name).write_text(head + tail)
    ingest_stage(settings, src, "run-1")
    gen = OpenAIQAGenerator(llm_endpoint.base_url, "sk-test", "loopback", timeout_s=5)
    qa_stage(settings, "run-1", generator=gen)
    index_stage(settings, "run-1")

    reg = Registry(settings.registry_path)
    docs = {Path(d.path).name: d.doc_id for d in reg.documents()}
    assert set(document_subjects(reg, list(docs.values())).values()) == {"Lumenvale Orbit 5.2"}
    texts = {name: [c.text for c in reg.chunks(doc_id=d)] for name, d in docs.items()}
    shared = set(texts["a.md"]) & set(texts["b.md"])
    own = set(texts["a.md"]) - shared
    assert shared and own  # the precondition: one chunk in common, one of a's own

    def keys(chunk_texts: set[str]) -> set[str]:
        return {
            k
            for t in chunk_texts
            for k in cache_keys_ever(t, "loopback", gen.prompt_version, ["Lumenvale Orbit 5.2"])
        }

    stored = lambda ks: set(reg.cache_get_many(sorted(ks)))  # noqa: E731
    owned = stored(keys(own))
    assert stored(keys(shared)) and owned
    out = json_out(capsys, ["docs", "purge", str(src / "a.md"), "--json"])
    assert out["documents"] == 1 and out["llm_cache"] == len(owned)
    assert stored(keys(own)) == set()  # only a.md's chunks read these
    assert stored(keys(shared))  # b.md still reads the shared chunk's reply under its subject
    assert reg.chunks(doc_id=docs["b.md"]) and reg.qa_pairs(doc_id=docs["b.md"])
