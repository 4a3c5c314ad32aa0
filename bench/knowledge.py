"""Does the model know the new documents?  The benchmark every change to QA, training or evaluation
is judged by.

The corpus in ``bench/knowledge/`` (12 invented documents in three parts, two edited documents, and
hand-written questions that the project's QA generator never produced; see its README) goes through
the project's real stages in a temporary data home, one refresh per part, then one for the edit:

    ingest → QA → (drop generated pairs about document-only facts) → index → train → evaluate → promote

Each arm (``moral``; ``lora``: plain peft LoRA r = 8 through the same pipeline; ``lora-rm``:
rank-matched, r = E·r) has its own home.  The hand-written questions are asked through ``moral
serve`` with the official ``openai`` client, closed- and open-book, and scored with the strict
metric (``tasks.metrics.strict_recall``).  One JSON object is printed on stdout:

* ``report`` — ``ra_strict`` on the ``report`` questions (⅔; choices are made on ``tune``) for base
  and each arm, split into trained-fact and document-only questions, each with n and a 95% Wilson
  interval; the same for ``tune`` under ``tune``;
* ``confabulation`` — share of unanswerable questions (entities in no document) answered with
  anything but a refusal;
* ``lifelong`` — part 1's recall after the refreshes (three, or ``--parts``) relative to its value
  at promotion;
* ``edit`` — after the edited documents are refreshed: recall of the new values and the rate of
  answers still giving the old ones;
* ``pipeline`` — per version, the pipeline's own ``paraphrase`` / ``unseen`` suites (closed, open),
  the world-knowledge NLL rise (format-neutral) and drift, with intervals, and the gate's decision;
* ``similarity`` — each hand-written question's MiniLM cosine and content-word Jaccard to its
  nearest trained question (quantiles); ``trained_fact_far`` is recall on the trained-fact questions
  far from every trained question by both paraphrase thresholds (``tasks.splits``). ``--keep-out``
  excludes generated wordings close to a hand-written question before training
  (``MORAL_HOLDOUT_QUESTIONS``), so every trained-fact question is asked in words never trained;
* ``base.open_best_prompt`` — the base model open-book with each of a few system prompts
  (``BASE_OPEN_PROMPTS``): its best prompt, chosen on ``tune``, is what open-book is compared with;
* ``seconds`` — QA, training and evaluation wall time.

    .venv/bin/python bench/knowledge.py                        # the full run (see BENCHMARKS.md)
    .venv/bin/python bench/knowledge.py --arms moral            # one arm (base is always asked)
    .venv/bin/python bench/knowledge.py --quick                 # smoke run (tests): part 1 only, tiny sizes
    .venv/bin/python bench/knowledge.py --seeds 3               # repeat training with seeds 0, 1, 2
    .venv/bin/python bench/knowledge.py --arms moral --parts 1  # part 1 only: a fast loop, read on tune
    .venv/bin/python bench/knowledge.py --base-prompts DIR/moral-seed0  # the base model's prompts only

One file (~640 lines) because it is one script read top to bottom: the pipeline arms, the asking
through `moral serve`, the scoring and the JSON report share its constants and helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.settings import Settings, apply_runtime_env  # noqa: E402

CORPUS = ROOT / "bench" / "knowledge"
PARTS = ("part1", "part2", "part3")
ARMS = ("moral", "lora", "lora-rm")
MAX_TOKENS = 32


# --- the corpus ---------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_corpus(corpus: Path = CORPUS) -> dict:
    return {
        "facts": read_jsonl(corpus / "facts.jsonl"),
        "questions": read_jsonl(corpus / "questions.jsonl"),
        "edit_questions": read_jsonl(corpus / "edit_questions.jsonl"),
    }


def doc_only_values(facts: Sequence[dict]) -> dict[str, list[list[str]]]:
    """Document file name -> the value aliases of its document-only facts."""
    out: dict[str, list[list[str]]] = {}
    for f in facts:
        if f.get("document_only"):
            out.setdefault(Path(f["doc"]).name, []).append(list(f["value"]))
    return out


def asks_about(question: str, answer: str, aliases: Sequence[str]) -> bool:
    """A generated pair asks about a fact when the fact's value is its answer or is in its question
    (a reversed question names the value and asks for the other side)."""
    from tasks.dedup import answers_agree
    from tasks.text import contains_span

    return any(
        contains_span(answer, a) or contains_span(question, a) or answers_agree(answer, a) for a in aliases
    )


def drop_document_only(settings: Settings, facts: Sequence[dict], run_id: str) -> int:
    """Exclude the generated pairs that ask about document-only facts, before they are indexed."""
    from storage.registry import Registry

    reg = Registry.from_settings(settings)
    values = doc_only_values(facts)
    docs = {d.doc_id: Path(d.path).name for d in reg.documents()}
    drop = [
        p.qa_id
        for p in reg.qa_pairs()
        if any(
            asks_about(p.question, p.answer, aliases) for aliases in values.get(docs.get(p.doc_id, ""), [])
        )
    ]
    return reg.exclude_pairs(drop, "bench: asks about a document-only fact", actor="bench", run_id=run_id)


# --- one refresh through the real stages ---------------------------------------------------------
def refresh(settings: Settings, source: Path, facts: Sequence[dict], kind: str) -> dict:
    """ingest → QA → drop document-only pairs → index → train → evaluate → promote, timed."""
    from storage.registry import Registry
    from tasks.stages.evaluate import evaluate_stage
    from tasks.stages.index import index_stage
    from tasks.stages.ingest import ingest_stage
    from tasks.stages.promote import promote_stage
    from tasks.stages.qa import qa_stage
    from tasks.stages.train import train_stage

    reg = Registry.from_settings(settings)
    run_id = reg.start_run({"source": str(source), "bench": "knowledge", "kind": kind})
    out: dict = {"seconds": {}}
    t0 = time.perf_counter()
    ingest_stage(settings, source, run_id)
    t1 = time.perf_counter()
    qa = qa_stage(settings, run_id)
    out["qa_generated"] = qa.qa_generated
    out["qa_dropped_document_only"] = drop_document_only(settings, facts, run_id)
    idx = index_stage(settings, run_id)
    out.update(qa_indexed=idx.qa_indexed, qa_held_out=idx.qa_held_out)
    t2 = time.perf_counter()
    out["seconds"]["ingest"] = round(t1 - t0, 1)
    out["seconds"]["qa_index"] = round(t2 - t1, 1)
    tr = train_stage(settings, run_id, kind=kind)
    t3 = time.perf_counter()
    out["seconds"]["train"] = round(t3 - t2, 1)
    out["train_pairs"] = tr.delta_pairs + tr.replay_pairs
    if tr.version is None:
        out["version"], out["decision"], out["reasons"] = None, "skipped", [tr.reason]
        reg.finish_run(run_id, "completed", out)
        return out
    evaluate_stage(settings, run_id, tr.version)
    t4 = time.perf_counter()
    out["seconds"]["evaluate"] = round(t4 - t3, 1)
    pr = promote_stage(settings, run_id, tr.version)
    out.update(version=tr.version, decision=pr.decision, reasons=pr.reasons)
    out["pipeline"] = pipeline_suites(settings, tr.version)
    reg.finish_run(run_id, "completed", out)
    return out


def _ci(values: Sequence[float], seed: int = 0) -> dict:
    from tasks.metrics import interval, mean

    if not values:
        return {"value": None, "n": 0, "ci": None}
    low, high = interval(values, seed=seed)
    return {"value": round(mean(values), 4), "n": len(values), "ci": [round(low, 4), round(high, 4)]}


def pipeline_suites(settings: Settings, version: int) -> dict:
    """The evaluate stage's own held-out suites and forgetting checks for one version."""
    from storage.home import scores_path

    saved = json.loads(scores_path(settings, version).read_text())
    scores = saved["scores"]
    out: dict = {}
    for key in ("paraphrase", "paraphrase:open", "unseen", "unseen:open", "trained_recall", "retention"):
        if key in scores:
            out[key] = {m: _ci(v.get("ra_strict", [])) for m, v in scores[key].items()}
    metrics = json.loads(json.dumps(saved.get("means", {})))
    for suite in ("world_knowledge", "drift"):
        if suite in metrics:
            nll = {m: v.get("nll") for m, v in metrics[suite].items()}
            base = nll.get("base")
            cand = nll.get("candidate")
            out[suite] = {
                "nll": nll,
                "relative_rise": None if not base or cand is None else round(cand / base - 1, 4),
            }
    from tasks.gate import GateThresholds, decide

    gate = decide(scores, GateThresholds.from_settings(settings), has_champion=saved["has_champion"])
    out["gate_checks"] = {c.name: {k: round(v, 4) for k, v in c.values.items()} for c in gate.checks}
    return out


# --- asking through `moral serve` ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(env: dict[str, str], timeout_s: float = 300.0) -> Iterator[str]:
    """``moral serve`` on a loopback port for this data home; yields its /v1 base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moral")), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moral serve exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("moral serve did not become healthy")
            time.sleep(0.5)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


#: Requests the server refused (e.g. an open-book prompt beyond a tiny model's context): scored as
#: empty answers, counted in the output.
REFUSED: dict[str, int] = {}


def ask_all(
    base_url: str, model: str, questions: Sequence[str], open_book: bool, system: str | None = None
) -> list[str]:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=base_url, api_key=os.environ.get("MORAL_SERVE_API_KEY") or "unused", timeout=120)
    extra = {"moral": {"open_book": True, "k": 3}} if open_book else None
    head = [{"role": "system", "content": system}] if system else []
    answers = []
    for q in questions:
        try:
            reply = client.chat.completions.create(
                model=model,
                messages=[*head, {"role": "user", "content": q}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stop=["\n"],  # strict recall reads the first line only
                extra_body=extra,
            )
        except BadRequestError as exc:
            key = f"{model} {'open' if open_book else 'closed'}: {str(exc)[:120]}"
            REFUSED[key] = REFUSED.get(key, 0) + 1
            answers.append("")
            continue
        answers.append(reply.choices[0].message.content or "")
    return answers


def score(questions: Sequence[dict], answers: Sequence[str], key: str = "answers") -> list[float]:
    from tasks.metrics import strict_recall

    return [strict_recall(a, q[key][0], q[key][1:]) for q, a in zip(questions, answers, strict=True)]


def trained_facts(settings: Settings, facts: Sequence[dict]) -> set[str]:
    """The corpus facts some trained pair asks about (its document, its value in question or answer):
    a "trained" fact whose pairs all went to dev or eval (per-fact splits) was never trained."""
    from storage.registry import Registry

    reg = Registry.from_settings(settings)
    trained = set(reg.trained_pairs())
    names = {d.doc_id: Path(d.path).name for d in reg.documents()}
    by_doc: dict[str, list] = {}
    for p in reg.qa_pairs(status=None):
        if p.qa_id in trained:
            by_doc.setdefault(names.get(p.doc_id, ""), []).append(p)
    return {
        f["fact_id"]
        for f in facts
        if any(asks_about(p.question, p.answer, f["value"]) for p in by_doc.get(Path(f["doc"]).name, []))
    }


def grouped(
    questions: Sequence[dict],
    answers: Sequence[str],
    seen: set[str] | None = None,
    far: set[str] | None = None,
) -> dict:
    """Strict recall by split (tune/report) and group (trained/document_only), and confabulation;
    with ``seen`` (facts some trained pair asks about), the trained group split by that too, and with
    ``far`` (qids far from every trained question) the trained-fact questions that are far."""
    from tasks.metrics import is_refusal

    out: dict = {}
    for split in ("tune", "report"):
        rows = [(q, a) for q, a in zip(questions, answers, strict=True) if q["split"] == split]
        answerable = [(q, a) for q, a in rows if q["group"] != "unanswerable"]
        res = {"all": _ci(score([q for q, _ in answerable], [a for _, a in answerable]))}
        for group in ("trained", "document_only"):
            sub = [(q, a) for q, a in answerable if q["group"] == group]
            res[group] = _ci(score([q for q, _ in sub], [a for _, a in sub]))
        if seen is not None:
            for name, keep in (("trained_fact_trained", True), ("trained_fact_not_trained", False)):
                sub = [
                    (q, a)
                    for q, a in answerable
                    if q["group"] == "trained" and (q["fact_id"] in seen) == keep
                ]
                res[name] = _ci(score([q for q, _ in sub], [a for _, a in sub]))
            if far is not None:
                sub = [
                    (q, a)
                    for q, a in answerable
                    if q["group"] == "trained" and q["fact_id"] in seen and q["qid"] in far
                ]
                res["trained_fact_far"] = _ci(score([q for q, _ in sub], [a for _, a in sub]))
        unans = [a for q, a in rows if q["group"] == "unanswerable"]
        res["confabulation"] = _ci([1.0 - is_refusal(a) for a in unans])
        out[split] = res
    return out


def ask_suite(
    url: str,
    model: str,
    questions: Sequence[dict],
    seen: set[str] | None = None,
    far: set[str] | None = None,
) -> dict:
    texts = [q["question"] for q in questions]
    out = {}
    for mode, open_book in (("closed", False), ("open", True)):
        answers = ask_all(url, model, texts, open_book)
        out[mode] = {"scores": grouped(questions, answers, seen, far), "answers": answers}
    return out


#: System prompts the base model is also asked open-book with: the issue compares open-book recall
#: with *the base model's best prompt* (the pipeline's own prompt has no system turn, and the base
#: model answers it in whole sentences). The prompt with the best ``tune`` recall is the base
#: model's score; ``report`` is read off that prompt, never chosen on.
BASE_OPEN_PROMPTS: dict[str, str | None] = {
    "default": None,
    "short": "Answer with the answer only: a few words, a number with its unit, or a name. "
    "Never write a full sentence.",
    "span": "Reply with the exact words from the passages that answer the question, and nothing else.",
}


def ask_base_open(
    url: str,
    questions: Sequence[dict],
    seen: set[str] | None = None,
    far: set[str] | None = None,
    default_answers: Sequence[str] | None = None,
) -> dict:
    """The base model asked open-book with each of :data:`BASE_OPEN_PROMPTS` (the default prompt's
    answers reused when given); its best prompt chosen on ``tune``."""
    texts = [q["question"] for q in questions]
    by_prompt = {}
    for name, system in BASE_OPEN_PROMPTS.items():
        if system is None and default_answers is not None:
            answers = list(default_answers)
        else:
            answers = ask_all(url, "moral-refresh@base", texts, True, system=system)
        by_prompt[name] = grouped(questions, answers, seen, far)
    best = max(by_prompt, key=lambda n: by_prompt[n]["tune"]["all"]["value"] or 0.0)
    return {"chosen_on_tune": best, "scores": by_prompt[best], "by_prompt": by_prompt}


def measured(settings: Settings) -> dict:
    """Which version a figure comes from, and the gate's word on it."""
    from storage.registry import Registry

    versions = [v for v in Registry.from_settings(settings).list_versions() if v.artifact_uri]
    if not versions:
        return {"version": None, "status": "base model (nothing trained)"}
    return {"version": versions[-1].version, "status": versions[-1].status}


# --- one arm --------------------------------------------------------------------------------------
def arm_env(
    home: Path, arm: str, seed: int, quick: bool, extra: dict[str, str], keep_out: bool = False
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAL_") or k == "MORAL_MODEL_CACHE"}
    env.update(
        {
            "MORAL_HOME": str(home),
            "MORAL_SEED": str(seed),
            "MORAL_FIVEL_SIZE": "0",  # not what this benchmark measures: the minutes go to training
            "MORAL_RECALL_SAMPLE": "20",
        }
    )
    if keep_out:  # --keep-out: a generated wording close to a hand-written question is never trained
        env["MORAL_HOLDOUT_QUESTIONS"] = str(CORPUS / "questions.jsonl")
    if arm == "lora-rm":
        experts = int(extra.get("MORAL_NUM_EXPERTS", os.environ.get("MORAL_NUM_EXPERTS", "8")))
        rank = int(extra.get("MORAL_RANK", os.environ.get("MORAL_RANK", "8")))
        env["MORAL_RANK"] = str(experts * rank)
    if quick:
        env.update(
            {
                "MORAL_EPOCHS": "1",
                "MORAL_HOLDOUT_SIZE": "4",
                "MORAL_DRIFT_SIZE": "4",
                "MORAL_GATE_MIN_N": "1",
                "MORAL_GATE_OVERRIDE": "bench --quick: a smoke run on tiny suites",
                "MORAL_RECALL_SAMPLE": "4",
                "MORAL_QA_PAIRS_PER_CHUNK": "2",
            }
        )
    env.update(extra)
    return env


def settings_from(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def latest_model(settings: Settings) -> str:
    """The served model name of the newest version, promoted or not: the benchmark measures what
    training produced (the gate's decision is reported beside it); the base model before any."""
    from storage.registry import Registry

    versions = [v for v in Registry.from_settings(settings).list_versions() if v.artifact_uri]
    return f"moral-refresh@v{versions[-1].version}" if versions else "moral-refresh@base"


def trained_questions(settings: Settings) -> list[str]:
    from storage.registry import Registry

    reg = Registry.from_settings(settings)
    trained = set(reg.trained_pairs())
    return [p.question for p in reg.qa_pairs(status=None) if p.qa_id in trained]


def nearest(settings: Settings, questions: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """qid -> (MiniLM cosine, content-word Jaccard) of each answerable hand-written question to its
    nearest trained question; {} when nothing was trained."""
    from storage.vectors import Embedder
    from tasks.splits import jaccard, normalised_rows

    trained = trained_questions(settings)
    asked = [q for q in questions if q["group"] != "unanswerable"]
    if not trained or not asked:
        return {}
    embed = Embedder.from_settings(settings).encode
    texts = [q["question"] for q in asked]
    cos = (normalised_rows(embed(texts)) @ normalised_rows(embed(trained)).T).max(axis=1)
    return {
        q["qid"]: (float(c), max(jaccard(q["question"], t) for t in trained))
        for q, c in zip(asked, cos, strict=True)
    }


def far_questions(near: dict[str, tuple[float, float]]) -> set[str]:
    """The qids far from every trained question by both paraphrase thresholds."""
    from tasks.splits import MAX_COSINE, MAX_JACCARD

    return {qid for qid, (c, j) in near.items() if c <= MAX_COSINE and j <= MAX_JACCARD}


def similarity(near: dict[str, tuple[float, float]]) -> dict:
    """Quantiles of the nearest-trained-question similarities (:func:`nearest`)."""
    import numpy as np

    if not near:
        return {}
    cos = np.array([c for c, _ in near.values()])
    jac = np.array([j for _, j in near.values()])

    def quantiles(x: np.ndarray) -> dict:
        return {
            k: round(float(np.quantile(x, p)), 3)
            for k, p in (("min", 0), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("max", 1))
        }

    return {
        "n": len(near),
        "cosine": {**quantiles(cos), "share_above_0.85": round(float((cos > 0.85).mean()), 3)},
        "jaccard": {**quantiles(jac), "share_above_0.5": round(float((jac > 0.5).mean()), 3)},
    }


def selected(questions: Sequence[dict], parts: int, quick: bool) -> list[dict]:
    """The hand-written questions a run asks: those of the first ``parts`` parts (what has been
    refreshed); a quick run asks part 1's ``tune`` questions only."""
    if quick:
        return [q for q in questions if q["part"] == 1 and q["split"] == "tune"]
    return [q for q in questions if q["part"] <= parts]


def run_arm(
    arm: str,
    work: Path,
    corpus: dict,
    seed: int,
    quick: bool,
    extra: dict[str, str],
    ask_base: bool,
    n_parts: int = len(PARTS),
    keep_out: bool = False,
) -> dict:
    home = work / f"{arm}-seed{seed}"
    source = work / f"src-{arm}-seed{seed}"
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    env = arm_env(home, arm, seed, quick, extra, keep_out)
    settings = settings_from(env)
    settings.ensure_dirs()
    kind = "moral" if arm == "moral" else "lora"
    questions = selected(corpus["questions"], n_parts, quick)
    part1_qs = [q for q in questions if q["part"] == 1]
    parts = PARTS[:1] if quick else PARTS[:n_parts]
    out: dict = {"arm": arm, "seed": seed, "refreshes": []}
    say = lambda m: print(f"[{arm} seed {seed}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    for i, part in enumerate(parts, start=1):
        for f in sorted((CORPUS / "docs" / part).iterdir()):
            if f.is_file():
                shutil.copy2(f, source / f.name)
        say(f"refresh {i}: {part}")
        r = refresh(settings, source, corpus["facts"], kind)
        say(f"refresh {i}: v{r.get('version')} {r.get('decision')} in {sum(r['seconds'].values()):.0f} s")
        out["refreshes"].append({"part": part, **r})
        if i == 1:
            out["part1_version"] = measured(settings)
            with served(env) as url:
                out["part1_at_promotion"] = {
                    m: grouped(
                        part1_qs, ask_all(url, latest_model(settings), [q["question"] for q in part1_qs], ob)
                    )["report"]
                    for m, ob in (("closed", False), ("open", True))
                }
    say("asking the hand-written questions")
    seen = trained_facts(settings, corpus["facts"])
    out["trained_facts"] = {
        "trained": len(seen),
        "of": sum(not f.get("document_only") for f in corpus["facts"]),
    }
    out["final_version"] = measured(settings)
    near = nearest(settings, questions)
    far = far_questions(near)
    with served(env) as url:
        final = ask_suite(url, latest_model(settings), questions, seen, far)
        out["report"] = {m: v["scores"] for m, v in final.items()}
        out["part1_after"] = {
            m: grouped(
                part1_qs, [a for q, a in zip(questions, final[m]["answers"], strict=True) if q["part"] == 1]
            )["report"]
            for m in ("closed", "open")
        }
        base = ask_suite(url, "moral-refresh@base", questions, seen, far) if ask_base else None
        if base is not None:
            base["open_best"] = ask_base_open(url, questions, seen, far, base["open"]["answers"])
    out["similarity"] = similarity(near)
    if not quick and n_parts == len(PARTS):
        for f in sorted((CORPUS / "docs" / "edited").iterdir()):
            if f.is_file():
                shutil.copy2(f, source / f.name)  # the edited documents replace their originals
        say("refresh: edited documents")
        r = refresh(settings, source, corpus["facts"], kind)
        out["refreshes"].append({"part": "edited", **r})
        eq = corpus["edit_questions"]
        with served(env) as url:
            out["edit"] = {"measured": measured(settings)}
            for m, ob in (("closed", False), ("open", True)):
                answers = ask_all(url, latest_model(settings), [q["question"] for q in eq], ob)
                out["edit"][m] = {
                    "new_value": _ci(score(eq, answers)),
                    "old_value": _ci(score(eq, answers, "old_answers")),
                }
    out["lifelong"] = {
        m: lifelong_ratio(out["part1_at_promotion"][m]["all"], out["part1_after"][m]["all"])
        for m in ("closed", "open")
    }
    from storage.chroma_server import stop_chroma_server

    stop_chroma_server(settings)  # `moral serve` started the home's shared Chroma server; it outlives it
    out["seconds"] = {
        k: round(sum(r["seconds"].get(k, 0) for r in out["refreshes"]), 1)
        for k in ("qa_index", "train", "evaluate")
    }
    shutil.rmtree(source, ignore_errors=True)
    return {"arm": out, "base": base}


def base_prompts_on(home: Path, corpus: dict, quick: bool = False) -> dict:
    """:func:`ask_base_open` against a finished arm's data home (``--base-prompts``; with ``--quick``
    part 1's tune questions only)."""
    env = {**os.environ, "MORAL_HOME": str(home)}  # the caller's settings (its base model) otherwise
    settings = settings_from(env)
    edited = {q["fact_id"] for q in corpus["edit_questions"]}
    asked = selected(corpus["questions"], len(PARTS), quick)
    questions = [q for q in asked if q["fact_id"] not in edited]
    seen = trained_facts(settings, corpus["facts"])
    far = far_questions(nearest(settings, questions))
    started = time.perf_counter()
    try:
        with served(env) as url:
            out = ask_base_open(url, questions, seen, far)
    finally:
        from storage.chroma_server import stop_chroma_server

        stop_chroma_server(settings)
    return {"home": str(home), "left_out_edited": len(asked) - len(questions),
            "seconds": round(time.perf_counter() - started, 1), **out}  # fmt: skip


def lifelong_ratio(at_promotion: dict, after: dict) -> dict:
    a, b = at_promotion.get("value"), after.get("value")
    return {"at_promotion": a, "after_three_refreshes": b, "ratio": None if not a else round(b / a, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="moral,lora", help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=1, help="repeat training with seeds 0..N-1")
    parser.add_argument("--quick", action="store_true", help="smoke run: part 1 only, tiny sizes")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument(
        "--parts",
        type=int,
        choices=range(1, len(PARTS) + 1),
        default=len(PARTS),
        help="refresh only the first N parts and ask their questions; the edit runs only with all "
        "(--parts 1: a ~20-minute loop for choices read on the tune questions)",
    )
    parser.add_argument(
        "--keep-out",
        action="store_true",
        help="exclude generated wordings close to a hand-written question before training",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="MORAL_X=V", help="a setting for every arm (repeatable)"
    )
    parser.add_argument(
        "--base-prompts",
        type=Path,
        metavar="HOME",
        help="only ask the base model open-book with each of BASE_OPEN_PROMPTS, retrieving from the "
        "data home of a finished arm (--work DIR/moral-seed0); questions about the facts the edit "
        "changed are left out (the home's index holds the new values by then)",
    )
    args = parser.parse_args(argv)
    apply_runtime_env()
    if args.base_prompts:
        print(json.dumps(base_prompts_on(args.base_prompts, load_corpus(), args.quick), indent=1))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := set(arms) - set(ARMS):
        parser.error(f"unknown arms: {sorted(unknown)}")
    extra = dict(kv.split("=", 1) for kv in args.set)
    corpus = load_corpus()
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="moral-knowledge-"))
    result: dict = {"command": "python bench/knowledge.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "arms": {}, "base": None}  # fmt: skip
    try:
        for seed in range(args.seeds):
            for n, arm in enumerate(arms):
                got = run_arm(
                    arm,
                    work,
                    corpus,
                    seed,
                    args.quick,
                    extra,
                    ask_base=(seed == 0 and n == 0),
                    n_parts=args.parts,
                    keep_out=args.keep_out,
                )
                result["arms"].setdefault(arm, []).append(got["arm"])
                if got["base"] is not None:
                    best = got["base"].pop("open_best")
                    result["base"] = {m: v["scores"] for m, v in got["base"].items()}
                    result["base"]["open_best_prompt"] = best
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["counts"] = {
        g: sum(q["group"] == g for q in corpus["questions"])
        for g in ("trained", "document_only", "unanswerable")
    }
    result["refused_requests"] = REFUSED
    result["seconds_total"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
