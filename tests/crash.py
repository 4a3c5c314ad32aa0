"""Crash harness shared by the crash test (a few kill points, in CI) and ``bench/crash.py`` (every
point): a real ``moral refresh`` process with the tiny model and a loopback LLM endpoint, killed with
SIGKILL at a failpoint (``storage.failpoints``), then run again, then the data home checked.

The checks are the crash contract: the rerun completes; no chunk, pair or vector is duplicated; the
registry and Chroma agree; every version is registered whole (files verified); the LLM is paid at
most once per prompt beyond what was in flight at the kill (``qa_concurrency`` = 1: one request).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def refresh_env(home: Path, base_model: Path, llm_url: str, crash_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAL_") or k == "MORAL_MODEL_CACHE"}
    env.update(
        MORAL_HOME=str(home),
        MORAL_BASE_MODEL=str(base_model),
        MORAL_QA_BACKEND="openai",
        MORAL_QA_BASE_URL=llm_url,
        MORAL_QA_API_KEY="sk-test-not-a-secret",
        MORAL_QA_MODEL="loopback-qa",
        MORAL_QA_CONCURRENCY="1",
        MORAL_HOLDOUT_SIZE="4",
        MORAL_DRIFT_SIZE="4",
        MORAL_GATE_OVERRIDE="crash test: a tiny model on tiny suites",
        MORAL_EPOCHS="1",
        MORAL_NUM_EXPERTS="4",
        PYTHONPATH=str(ROOT),
    )
    env.pop("MORAL_CRASH_AT", None)
    if crash_at:
        env["MORAL_CRASH_AT"] = crash_at
    return env


def run_refresh(
    source: Path, env: dict[str, str], timeout_s: float = 600, leave_orphans: bool = False
) -> subprocess.CompletedProcess:
    """``moral refresh --json`` in its own process group. Output goes to files, not pipes: a killed
    refresh leaves its Prefect server child orphaned with the pipes open. The group is killed
    afterwards, so nothing of the run outlives it (as after a reboot), unless ``leave_orphans``
    (then the caller kills the group ``proc.pid`` when done)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "refresh", "--source", str(source), "--json"],
            env=env, cwd=ROOT, stdout=out, stderr=err, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        finally:
            if not leave_orphans or proc.poll() is None:
                kill_group(proc.pid)
            proc.wait()
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(proc.args, rc, out.read(), err.read())
        done.pid = proc.pid  # type: ignore[attr-defined]
        return done


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)  # the orphans: Prefect's temporary server
    except ProcessLookupError:
        pass


def recorded_prefect_server(home: Path) -> int | None:
    """The pid of the temporary Prefect server a refresh in ``home`` recorded, if still running."""
    from flows.local_server import STATE_FILE

    try:
        pid = int(json.loads((home / STATE_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
    return pid if prefect_server_alive(pid) else None


def prefect_server_alive(pid: int) -> bool:
    from flows.local_server import command_line
    from storage.lock import pid_alive

    return pid_alive(pid) and "prefect.server" in command_line(pid)


@dataclass
class HomeState:
    counts: dict[str, int]
    problems: list[str] = field(default_factory=list)


def check_home(home: Path) -> HomeState:
    """Counts of what the home holds and every way it breaks the crash contract."""
    from storage.artifacts import ArtifactError, verify_uri
    from storage.registry import Registry
    from storage.settings import Settings
    from storage.vectors import CHUNKS, QA_PAIRS, VectorStore

    settings = Settings(home=home)
    reg = Registry.from_settings(settings)
    problems: list[str] = []
    chunks = reg.chunks(status=None)
    pairs = reg.qa_pairs(status=None)
    for what, keys in (
        ("chunk id", [c.chunk_id for c in chunks]),
        ("chunk position", [(c.doc_id, c.idx) for c in chunks]),
        ("pair id", [p.qa_id for p in pairs]),
        ("pair", [(p.chunk_id, p.question, p.answer) for p in pairs]),
        ("document", [d.doc_id for d in reg.documents()]),
    ):
        dupes = [k for k, n in Counter(keys).items() if n > 1]
        if dupes:
            problems.append(f"{len(dupes)} duplicated {what}(s), e.g. {dupes[0]!r}")
    store = VectorStore(settings)
    chroma_chunks, chroma_pairs = store.ids(CHUNKS), store.ids(QA_PAIRS)
    for what, vectors, rows in (
        ("chunk", chroma_chunks, {c.chunk_id for c in chunks}),
        ("pair", chroma_pairs, {p.qa_id for p in pairs}),
    ):
        if len(vectors) != len(set(vectors)):
            problems.append(f"duplicated {what} vectors")
        if set(vectors) - rows:
            problems.append(f"{len(set(vectors) - rows)} {what} vectors without a registry row")
    if {c.chunk_id for c in reg.chunks()} - set(chroma_chunks):
        problems.append("active chunks missing from Chroma")
    unindexed = {p.qa_id for p in reg.qa_pairs()} - set(chroma_pairs)
    if unindexed:
        problems.append(f"{len(unindexed)} active pairs missing from Chroma")
    versions = reg.list_versions()
    for v in versions:
        try:
            verify_uri(v.artifact_uri, v.artifact_sha256, label=v.name)
        except ArtifactError as exc:
            problems.append(f"version registered half-way: {exc}")
    if sum(v.is_champion for v in versions) > 1:
        problems.append("more than one champion")
    runs = reg.runs(limit=100)
    if runs and runs[0].status != "completed":
        problems.append(f"the last run is {runs[0].status}")
    by_status = Counter(p.status for p in pairs)
    counts = {
        "documents": len(reg.documents()),
        "chunks": len(chunks),
        "pairs": len(pairs),
        **{f"pairs_{s}": n for s, n in sorted(by_status.items())},
        "chunk_vectors": len(chroma_chunks),
        "pair_vectors": len(chroma_pairs),
        "versions": len(versions),
    }
    return HomeState(counts, problems)


@dataclass
class KillResult:
    point: str
    killed: bool  # the first run died by SIGKILL (the point was reached)
    rerun_ok: bool
    state: HomeState
    llm_calls: int
    extra_llm_calls: int  # beyond a clean run's
    seconds: float
    problems: list[str]


def kill_and_rerun(
    point: str, work: Path, source: Path, base_model: Path, llm, reference: HomeState, reference_calls: int
) -> KillResult:
    """One kill point: a refresh killed there, a rerun, the checks against a clean run's home."""
    start = time.perf_counter()
    home = work / point.replace(":", "-")
    calls0 = llm.calls
    first = run_refresh(
        source, refresh_env(home, base_model, llm.base_url, crash_at=point), leave_orphans=True
    )
    killed = first.returncode == -signal.SIGKILL
    problems = (
        [] if killed else [f"the first run was not killed (rc {first.returncode}): {first.stderr[-400:]}"]
    )
    orphan = recorded_prefect_server(home)  # the killed run's temporary Prefect server, still up
    try:
        second = run_refresh(source, refresh_env(home, base_model, llm.base_url))
        if killed and orphan is None:
            problems.append("the killed run left no running temporary Prefect server on record")
        elif orphan is not None and prefect_server_alive(orphan):
            problems.append(f"the killed run's temporary Prefect server (pid {orphan}) outlived the rerun")
    finally:
        if orphan is not None and prefect_server_alive(orphan):
            kill_group(first.pid)  # type: ignore[attr-defined]
    rerun_ok = second.returncode == 0
    if rerun_ok:
        summary = json.loads(second.stdout)
        rerun_ok = summary.get("status") == "completed"
    if not rerun_ok:
        problems.append(f"the rerun failed (rc {second.returncode}): {second.stderr[-800:]}")
    state = check_home(home)
    problems += state.problems
    if state.counts != reference.counts:
        problems.append(f"counts {state.counts} differ from a clean run's {reference.counts}")
    calls = llm.calls - calls0
    extra = calls - reference_calls
    if extra > 1:  # qa_concurrency 1: at most the one request in flight at the kill is paid again
        problems.append(f"{extra} LLM prompts paid twice")
    return KillResult(point, killed, rerun_ok, state, calls, extra, time.perf_counter() - start, problems)
