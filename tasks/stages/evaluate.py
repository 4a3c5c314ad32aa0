"""The evaluate stage: build the suites for a version (held-out paraphrase and unseen facts,
trained recall, retention, 5L, world knowledge, drift) and score candidate, champion and base.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from storage.failpoints import failpoint
from storage.files import write_json_atomic
from storage.home import scores_path
from storage.records import Evaluation
from storage.registry import Registry
from storage.settings import Settings
from tasks.stages.progress import Progress, say
from tasks.stages.train import usable_champion


@dataclass
class EvaluateSummary:
    version: int
    has_champion: bool
    champion_note: str | None
    sizes: dict[str, int] = field(default_factory=dict)
    means: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


HELD_OUT_PER_FACT = 2


def held_out_suites(
    settings: Settings, reg: Registry, version: int, docs: set[str] | None = None
) -> dict[str, list]:
    """Eval pairs of ``docs`` (default: the version's delta documents) as the two held-out suites,
    re-checked against every pair any version was trained on (``tasks.splits``):

    * an eval question is scored only when it is far (Jaccard ≤ 0.5 and cosine ≤ 0.85) from every
      trained question of its document, under any of the document's versions (same path), the
      subject of every version said as "it" on both sides (``tasks.splits.without_subject``): a
      closer one is dropped, never scored, whatever fact it was filed under; so is one that says
      nothing once the subject is out (``says_what``: "What is it?");
    * ``paraphrase`` — the rest whose fact was trained (same fact id, or a trained pair of the same
      document whose answer agrees);
    * ``unseen`` — the rest, facts no trained pair asks about;

    each at most ``HELD_OUT_PER_FACT`` wordings per fact (more wordings of one fact re-ask what one
    answer already shows, at the price of a generation per model and mode, and count one fact as
    several questions: an unseen fact's wordings whose answer agrees with a trained pair's all land
    in ``paraphrase``).
    """
    from storage.vectors import Embedder
    from tasks.chunking import document_subjects
    from tasks.dedup import answers_agree
    from tasks.splits import far_apart, normalised_rows, says_what, without_subject

    lineage = reg.trained_pairs(version)
    everything = {p.qa_id: p for p in reg.qa_pairs(status=None)}
    if docs is None:
        docs = {everything[q].doc_id for q, role in lineage.items() if role == "delta" and q in everything}
    path_of = {d.doc_id: d.path for d in reg.documents()}
    trained_ids = set(lineage) | set(reg.trained_pairs())
    trained = [everything[q] for q in sorted(trained_ids) if q in everything]
    by_fact: dict[str, list] = {}
    by_path: dict[str, list] = {}
    for p in trained:
        by_fact.setdefault(p.fact_id, []).append(p)
        by_path.setdefault(path_of.get(p.doc_id, p.doc_id), []).append(p)
    candidates = [p for p in reg.qa_pairs(split="eval") if p.doc_id in docs]
    out: dict[str, list] = {"paraphrase": [], "unseen": []}
    if not candidates:
        return out
    paths = {path_of.get(p.doc_id, p.doc_id) for p in candidates}
    # Distances leave out the document's subject, which every wording of its facts names: the
    # subjects of all versions of its path (an edited title names it anew; retired versions count).
    near = [t for x in paths for t in by_path.get(x, [])]
    subject = document_subjects(reg, sorted({p.doc_id for p in [*candidates, *near]}), status=None)
    subjects_of: dict[str, set] = {}
    for doc_id, name in subject.items():
        subjects_of.setdefault(path_of.get(doc_id, doc_id), set()).add(name)

    def bare(p) -> str:
        return without_subject(p.question, subjects_of.get(path_of.get(p.doc_id, p.doc_id)))

    texts = sorted({bare(p) for p in candidates} | {bare(t) for t in near})
    row = {t: i for i, t in enumerate(texts)}
    emb = normalised_rows(Embedder.from_settings(settings).encode(texts))
    for p in candidates:
        same_doc = by_path.get(path_of.get(p.doc_id, p.doc_id), [])
        if not says_what(bare(p)):
            continue  # "What is it?" (subject out) is far from everything only because it says nothing
        if not far_apart(bare(p), [bare(t) for t in same_doc], emb[row[bare(p)]],
                         emb[[row[bare(t)] for t in same_doc]] if same_doc else None):  # fmt: skip
            continue
        fact_trained = p.fact_id in by_fact or any(answers_agree(t.answer, p.answer) for t in same_doc)
        out["paraphrase" if fact_trained else "unseen"].append(p)
    for suite, pairs in out.items():
        per_fact: dict[str, int] = {}
        keep: set[str] = set()
        for p in sorted(pairs, key=lambda p: p.qa_id):
            per_fact[p.fact_id] = per_fact.get(p.fact_id, 0) + 1
            if per_fact[p.fact_id] <= HELD_OUT_PER_FACT:
                keep.add(p.qa_id)
        out[suite] = [p for p in pairs if p.qa_id in keep]
    return out


def build_suites(settings: Settings, reg: Registry, version: int) -> list:
    """The evaluation suites for a candidate, each document suite closed- and open-book:

    * ``paraphrase`` / ``unseen`` — the delta's held-out questions (see ``held_out_suites``);
    * ``trained_recall`` — a sample of the delta pairs it was trained on;
    * ``retention`` — held-out paraphrase questions of documents that *earlier* shipped versions were
      trained on (whether or not this version replayed them), for domain retention;
    * ``faith`` / ``filter`` / ``refusal`` — the 5L-bench suites from the delta's held-out pairs;
    * ``world_knowledge`` — the FanOutQA holdout, closed-book, NLL in the format-neutral prompt;
    * ``drift`` — fixed general prompts, answered by the base model at evaluation time.
    """
    from tasks.evaluate import EvalItem, Suite
    from tasks.fivel import SourcedPair, fivel_suites
    from tasks.holdout import drift_prompts, holdout_sample

    lineage = reg.trained_pairs(version)
    active = {p.qa_id: p for p in reg.qa_pairs()}
    delta_docs = {active[q].doc_id for q, role in lineage.items() if role == "delta" and q in active}
    earlier_docs: set[str] = set()
    for v in reg.list_versions():
        if v.version < version and v.status in ("promoted", "revoked"):  # knowledge that shipped
            earlier_docs |= {active[q].doc_id for q in reg.trained_pairs(v.version) if q in active}
    held = held_out_suites(settings, reg, version, delta_docs)
    # Retention: what earlier versions shipped, asked the held-out way (far paraphrases of trained
    # facts of their documents); facts never trained are not knowledge that could be forgotten.
    retained = held_out_suites(settings, reg, version, earlier_docs - delta_docs)["paraphrase"]
    recall = sorted(
        (active[q] for q, r in lineage.items() if r == "delta" and q in active), key=lambda p: p.qa_id
    )[: settings.recall_sample]
    suites = []
    for name, pairs, extras in (
        ("paraphrase", held["paraphrase"], ("qr", "fl")),
        ("unseen", held["unseen"], ()),
        ("trained_recall", recall, ()),
        ("retention", retained, ()),
    ):
        if not pairs and name != "paraphrase":
            continue  # paraphrase stays, even empty: the gate says why it cannot promote
        items = [EvalItem(p.question, p.answer, ref=p.fact_id) for p in pairs]
        suites.append(Suite(name, items, extras=extras))
        if pairs:
            suites.append(
                Suite(name, open_book_items(settings, items, k=settings.open_book_k), "open", extras=extras)
            )
    new = held["paraphrase"] + held["unseen"]
    if new and settings.fivel_size > 0:
        chunks = {c.chunk_id: c for c in reg.chunks()}
        sourced = [
            SourcedPair(p.question, p.answer, chunks[p.chunk_id].text, p.doc_id)
            for p in sorted(new, key=lambda p: p.qa_id)
            if p.chunk_id in chunks
        ]
        pool = [(c.doc_id, c.text) for c in chunks.values() if c.doc_id not in delta_docs] or [
            (c.doc_id, c.text) for c in chunks.values()
        ]
        suites += fivel_suites(sourced, pool, settings.fivel_size, settings.fivel_distractors, settings.seed)
    holdout = holdout_sample(settings.holdout_size, settings.seed)
    if holdout:
        items = [EvalItem(h.question, h.answer) for h in holdout]
        suites.append(Suite("world_knowledge", items, nll=True, chat=False))
    if prompts := drift_prompts(settings.drift_size, settings.seed):
        suites.append(Suite("drift", [EvalItem(q, "") for q in prompts], kind="drift"))
    return suites


def open_book_items(settings: Settings, items: list, k: int = 3) -> list:
    """The items, each with the top-k chunks retrieved from the index for its question as context."""
    from dataclasses import replace

    from storage.vectors import CHUNKS, VectorStore

    store = VectorStore(settings)
    hits = store.query(CHUNKS, [it.question for it in items], k=k, where={"status": "active"})
    return [
        replace(it, context="\n\n".join(h.text for h in row)) for it, row in zip(items, hits, strict=True)
    ]


def base_memo(settings: Settings, base_sha256: str):
    """The base model's memoised evaluation outputs, shared by every data home on this machine."""
    from tasks.evaluate import BaseMemo

    return BaseMemo.for_base(settings.model_cache, base_sha256)


def fact_documents(reg: Registry, fact_ids: Sequence[str]) -> dict[str, dict]:
    """fact_id -> {doc_id, path} of the document each fact comes from."""
    wanted = set(fact_ids)
    paths = {d.doc_id: d.path for d in reg.documents()}
    out: dict[str, dict] = {}
    for p in reg.qa_pairs(status=None):
        if p.fact_id in wanted and p.fact_id not in out:
            out[p.fact_id] = {"doc_id": p.doc_id, "path": paths.get(p.doc_id)}
    return out


def evaluate_stage(
    settings: Settings, run_id: str, version: int, progress: Progress | None = None, force: bool = False
) -> EvaluateSummary:
    """Base, champion and candidate on every suite; per-item scores saved for the gate, rows in the registry.

    ``force`` re-evaluates even when scores are saved (``moral eval --rerun``): the new scores replace
    the file atomically and the registry gains a new set of rows (older ones stay, append-only)."""
    from tasks.evaluate import evaluate_versions, evaluation_rows

    reg = Registry.from_settings(settings)
    cand = reg.get_version(version)
    path = scores_path(settings, version)
    from moe.base_model import base_model_identity

    base_path, identity = base_model_identity(settings.base_model, settings.model_cache)
    champion, note = usable_champion(reg, identity["sha256"])
    if champion is not None and champion.version == version:
        champion = None
    from storage.artifacts import verify_uri
    from storage.vectors import Embedder

    # Always, also before reusing saved scores: the gate then decides on files that are there as recorded.
    for v in [cand] + ([champion] if champion is not None else []):
        verify_uri(v.artifact_uri, v.artifact_sha256, label=v.name)
    made_with = {
        "base_sha256": identity["sha256"],
        "candidate_sha256": cand.artifact_sha256,
        "champion_version": champion.version if champion is not None else None,
        "champion_sha256": champion.artifact_sha256 if champion is not None else None,
    }
    if path.exists() and not force:
        saved = json.loads(path.read_text())
        stale = [k for k, want in made_with.items() if saved.get(k, "unrecorded") != want]
        if not stale:
            say(
                progress,
                f"evaluate: v{version} already evaluated against the same models, reusing its scores",
            )
            return EvaluateSummary(
                version, saved["has_champion"], saved.get("champion_note"), saved["sizes"], saved["means"]
            )
        say(
            progress,
            f"evaluate: v{version}'s saved scores were made with another {', '.join(stale)}: evaluating again",
        )
    suites = build_suites(settings, reg, version)
    sizes = {s.key: len(s.items) for s in suites}
    say(progress, "evaluate: " + ", ".join(f"{k} n={n}" for k, n in sizes.items()))
    output = evaluate_versions(
        base_path,
        suites,
        candidate_dir=Path(cand.artifact_uri),
        champion_dir=Path(champion.artifact_uri) if champion is not None else None,
        max_new_tokens=settings.eval_max_new_tokens,
        embed=Embedder.from_settings(settings).encode,
        progress=lambda m: say(progress, f"evaluate: {m}"),
        memo=base_memo(settings, identity["sha256"]),
    )
    rows = evaluation_rows(output, suites, seed=settings.seed)
    reg.record_evaluations(
        [Evaluation(version=version, run_id=run_id, **r) for r in rows]  # type: ignore[arg-type]
    )
    failpoint("evaluate.recorded")
    means = {
        key: {
            model: {m: float(sum(v) / len(v)) for m, v in metrics.items() if v}
            for model, metrics in by.items()
        }
        for key, by in output.scores.items()
    }
    samples = {
        key: [
            {
                "question": it.question,
                "gold": it.answer,
                **{m: output.predictions[key][m][i] for m in output.predictions[key]},
            }
            for i, it in enumerate(s.items[:10])
        ]
        for s in suites
        if (key := s.key) in output.predictions
    }
    write_json_atomic(  # atomic: the gate never reads half a file
        path,
        {
            "version": version,
            "has_champion": champion is not None,
            **made_with,  # what the scores are valid for (a later run reuses them only if all match)
            "champion_note": note,
            "sizes": sizes,
            "means": means,
            "scores": output.scores,
            "samples": samples,
            # Per item of the document suites: the fact asked, its question and gold, and every
            # model's answer (per-document knowledge and per-fact diffs in the reports).
            "items": {
                s.key: [{"fact_id": it.ref, "question": it.question, "gold": it.answer} for it in s.items]
                for s in suites
                if s.key in output.predictions and any(it.ref for it in s.items)
            },
            "predictions": {
                s.key: output.predictions[s.key]
                for s in suites
                if s.key in output.predictions and any(it.ref for it in s.items)
            },
            "fact_docs": fact_documents(reg, [it.ref for s in suites for it in s.items if it.ref]),
        },
    )
    return EvaluateSummary(version, champion is not None, note, sizes, means)


def version_number(reg, version: str | None) -> int:
    """The named version's number, or the latest one's when None (a clear error when there is none)."""
    if version is not None:
        return reg.get_version(version).version
    versions = reg.list_versions()
    if not versions:
        raise ValueError("no adapter versions yet: run `moral refresh` first")
    return versions[-1].version


def rerun_evaluation(settings, version: str | None) -> int:
    """Re-evaluate a version (the latest when None) through the evaluate stage; returns its number."""
    from storage.registry import Registry

    reg = Registry.from_settings(settings)
    number = version_number(reg, version)
    run_id = reg.start_run({"command": "eval --rerun", "version": number})
    try:
        evaluate_stage(settings, run_id, number, force=True)
    except BaseException as exc:
        reg.finish_run(run_id, "failed", {"error": f"{type(exc).__name__}: {exc}"})
        raise
    reg.finish_run(run_id, "completed", {"evaluated": f"v{number}"})
    return number
