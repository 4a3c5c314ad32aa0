"""The ``knowledge-refresh`` flow: documents in, a gated adapter version out.

The flow body is the DAG and nothing else: ingest -> generate QA -> dedup+index -> train ->
evaluate -> promote, each a Prefect task over a plain stage function.  ``until`` stops after a
stage; a later run picks up from there because every stage only does what the registry says is
still to do.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path

from prefect import flow

from flows import prefect_tasks as t
from flows.params import RefreshParams, check_deployment_paths
from flows.rollback import current_flow_run_id, deployment_id, emit_adapter_event
from storage.failpoints import failpoint
from storage.lock import refresh_lock
from storage.registry import Registry
from storage.settings import Settings, get_settings

#: The settings a CLI run already resolved for its params, so the flow does not resolve them again.
_RESOLVED: ContextVar[tuple[str, Settings] | None] = ContextVar("moral_resolved_settings", default=None)


def settings_for(params: RefreshParams, base: Settings | None = None) -> Settings:
    """The process settings with this run's parameter overrides applied (and validated)."""
    if base is None and (hit := _RESOLVED.get()) is not None and hit[0] == params.model_dump_json():
        return hit[1]
    base = base or get_settings()
    overrides = params.overrides()
    if not overrides:
        return base
    return Settings(**{**base.model_dump(), **overrides})


def task_runner_for(settings: Settings):
    """The Prefect task runner named by ``MORAL_TASK_RUNNER``: threads (default) or Dask.

    Dask with ``MORAL_DASK_ADDRESS`` uses that cluster (workers on other machines need the same data
    home mounted, the registry's DuckDB file included); without it, a LocalCluster in this process.
    """
    if settings.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise RuntimeError(
                "MORAL_TASK_RUNNER=dask needs prefect-dask: pip install 'moral-refresh[dask]'"
            ) from exc
        if settings.dask_address:
            return DaskTaskRunner(address=settings.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": settings.task_runner_workers, "threads_per_worker": 1}
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=settings.task_runner_workers)


def refresh_flow(settings: Settings):
    """``knowledge_refresh`` with the task runner the settings choose (CLI runs and deployments)."""
    return knowledge_refresh.with_options(task_runner=task_runner_for(settings))


@flow(
    name="knowledge-refresh",
    description="Ingest new documents, generate QA, index, train, evaluate, promote.",
)
def knowledge_refresh(params: RefreshParams = RefreshParams()) -> dict:  # noqa: B008 - pydantic defaults are immutable here
    """One knowledge refresh. Returns the run summary (also stored with the run in the registry)."""
    started = time.perf_counter()
    if deployment_id() is not None:  # before any path is opened
        source, home = check_deployment_paths(params.source, params.home, get_settings())
        params = params.model_copy(update={"source": source, "home": home})
    settings = settings_for(params)
    settings.ensure_dirs()
    # One refresh per data home, however it was started: a second one fails here, naming the holder,
    # before it has written anything.
    with refresh_lock(settings.home, flow_run_id=current_flow_run_id()):
        return _refresh_locked(params, settings, started)


def _refresh_locked(params: RefreshParams, settings: Settings, started: float) -> dict:
    from flows.local_server import record_local_server

    record_local_server(settings.home)  # a later refresh stops it if this one is killed
    reg = Registry.from_settings(settings)
    run_id = reg.start_run(params.model_dump(), flow_run_id=current_flow_run_id())
    summary: dict = {
        "run_id": run_id,
        "status": "running",
        "version": None,
        "decision": "skipped",
        "reasons": [],
    }
    try:
        ing = t.ingest(settings, Path(settings.refresh_source), run_id)
        summary.update(_ingest_fields(ing))
        failpoint("ingest.done")
        if params.until == "ingest":
            return _finish(reg, summary, started, stopped="ingest")
        # Submitted, not called: QA generation and embedding run on the task runner chosen by
        # MORAL_TASK_RUNNER (threads here, or a Dask worker), see task_runner_for().
        qa = _generate_qa(settings, run_id)
        summary.update(_qa_fields(qa))
        failpoint("qa.done")
        if params.until == "qa":
            return _finish(reg, summary, started, stopped="qa")
        idx = t.dedup_and_index.submit(shipped(settings), run_id).result()
        summary.update(
            qa_duplicates=idx.qa_duplicates, qa_indexed=idx.qa_indexed, chunks_indexed=idx.chunks_indexed
        )
        failpoint("index.done")
        if params.until == "index":
            return _finish(reg, summary, started, stopped="index")
        tr = t.train(settings, run_id)
        summary["train"] = asdict(tr)
        failpoint("train.done")
        if tr.warning:
            summary["warnings"] = [*summary.get("warnings", []), tr.warning]
        if tr.version is None:
            summary["reasons"] = [tr.reason or "nothing to train"]
            return _finish(reg, summary, started)
        summary["version"] = f"v{tr.version}"
        if params.until == "train":
            return _finish(reg, summary, started, stopped="train")
        ev = t.evaluate(settings, run_id, tr.version)
        summary["evaluation"] = {"sizes": ev.sizes, "means": ev.means}
        failpoint("evaluate.done")
        if params.until == "evaluate":
            return _finish(reg, summary, started, stopped="evaluate")
        if settings.require_approval:
            waiting = await_approval(settings, reg, run_id, tr.version)
            if waiting is not None:
                summary.update(decision="awaiting approval", reasons=waiting)
                summary["artifacts"] = _publish(settings, tr.version)
                return _finish(reg, summary, started)
        pr = t.promote(settings, run_id, tr.version)
        summary.update(decision=pr.decision, reasons=pr.reasons)
        failpoint("promote.done")
        summary["artifacts"] = _publish(settings, tr.version)
        if pr.decision == "promoted":
            payload = {"operation": "promote", "version": f"v{tr.version}", "actor": "gate", "run_id": run_id}
            summary["event_emitted"] = emit_adapter_event("promoted", f"v{tr.version}", settings, payload)
        return _finish(reg, summary, started)
    except BaseException as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        reg.finish_run(run_id, "failed", summary)
        raise


def shipped(settings: Settings) -> Settings:
    """The settings a submitted task receives: on Dask (pickled to workers, possibly on other
    machines) without the API keys, which workers read from their own environment; on threads
    (same process) as they are."""
    return settings.without_secrets() if settings.task_runner == "dask" else settings


def _generate_qa(settings: Settings, run_id: str):
    """The QA stage on the task runner: one task with threads (the stage has its own bounded
    concurrency), or one task per shard of the pending chunks on Dask, so generation spreads over
    the cluster's workers. Each shard gets an equal part of the run's spend caps."""
    from tasks.stages.qa import merge_qa, qa_shards

    shards = qa_shards(settings, settings.task_runner_workers) if settings.task_runner == "dask" else []
    if len(shards) <= 1:
        return t.generate_qa.submit(shipped(settings), run_id).result()
    caps = {
        name: max(1, value // len(shards))
        for name in ("max_llm_calls", "max_llm_tokens")
        if (value := getattr(settings, name))
    }
    shard_settings = shipped(settings).model_copy(update=caps)
    futures = [t.generate_qa.submit(shard_settings, run_id, ids) for ids in shards]
    return merge_qa([f.result() for f in futures])


def _publish(settings: Settings, version: int) -> dict:
    """The run's markdown report and the registry table as Prefect artifacts, plus the version's
    plots; a reporting failure is logged and never fails a refresh whose decision is recorded."""
    from flows.artifacts import publish_artifacts

    try:
        return publish_artifacts(settings, version)
    except Exception as exc:  # noqa: BLE001 - reports are best effort once the registry is written
        import logging

        logging.getLogger("moral.refresh").warning("report artifacts not created: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _resumable() -> bool:
    """Whether this run lives on a Prefect server a person can resume it from.  A plain local run
    uses a temporary server that vanishes with the process, so nobody could ever press Resume."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) and current_flow_run_id() is not None


def await_approval(settings: Settings, reg: Registry, run_id: str, version: int) -> list[str] | None:
    """``require_approval``: pause before promotion until someone resumes the run in the Prefect UI.

    Returns None when promotion may go ahead (resumed, or the gate rejects anyway: nothing to
    approve).  Otherwise the version stays a *candidate* with the reasons "awaiting approval ..."
    (no server to resume from, or the timeout passed); `moral promote VERSION --force` or a later
    run without ``require_approval`` decides it.
    """
    from flows.artifacts import publish_artifacts
    from tasks.stages.promote import gate_decision

    _saved, decision, reasons = gate_decision(settings, version)
    if not decision.promote:
        return None
    if not _resumable():
        why = (
            "awaiting approval: this run is not attached to a Prefect server that can resume it "
            f"(set PREFECT_API_URL); approve with `moral promote v{version} --force --reason ...`"
        )
    else:
        from prefect.exceptions import FlowPauseTimeout
        from prefect.flow_runs import pause_flow_run

        reg.hold_for_approval(version, ["awaiting approval in the Prefect UI", *reasons], run_id=run_id)
        publish_artifacts(settings, version)  # the reviewer sees the numbers before resuming
        timeout = settings.approval_timeout_s
        try:
            pause_flow_run(timeout=timeout, poll_interval=max(1, min(10, timeout // 2)))
            return None
        except FlowPauseTimeout:
            why = f"awaiting approval: nobody resumed the run within {timeout} s"
    reasons = [why, *[f"gate: {r}" for r in reasons]]
    reg.hold_for_approval(version, reasons, run_id=run_id)
    return reasons


def _ingest_fields(ing) -> dict:
    return {
        "documents_new": len(ing.documents_new),
        "documents_unchanged": ing.documents_unchanged,
        "documents_renamed": len(ing.documents_renamed),
        "documents_retired": len(ing.documents_retired),
        "documents_quarantined": ing.documents_quarantined,
        "chunks": ing.chunks_added,
    }


def _qa_fields(qa) -> dict:
    return {
        "qa_generated": qa.qa_generated,
        "qa_rejected": qa.qa_rejected,
        "qa_failed": len(qa.qa_failed),
        "qa_failures": qa.qa_failed,
        "qa_left_for_next_run": qa.skipped_by_cap,
        "llm_calls": qa.llm_calls,
        "llm_tokens": qa.llm_tokens,
        "llm_cache_hits": qa.cache_hits,
        "qa_fingerprint": qa.fingerprint,
        "chunks_on_old_fingerprint": qa.chunks_on_old_fingerprint,
    }


def _finish(reg: Registry, summary: dict, started: float, stopped: str | None = None) -> dict:
    if stopped is not None:
        summary["decision"] = "skipped"
        summary["reasons"] = [f"stopped after {stopped}"]
        summary["stopped_after"] = stopped
    summary["status"] = "completed"
    summary["seconds"] = round(time.perf_counter() - started, 2)
    reg.finish_run(summary["run_id"], "completed", summary)
    return summary


EMPTY_FIELDS = {
    "documents_new": 0, "documents_unchanged": 0, "documents_renamed": 0, "documents_retired": 0,
    "documents_quarantined": [], "chunks": 0, "qa_generated": 0, "qa_rejected": 0, "qa_failed": 0,
    "qa_duplicates": 0, "qa_indexed": 0, "llm_calls": 0, "llm_tokens": 0,
}  # fmt: skip


_EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def quiet_console() -> None:
    """``--json``: Prefect's console handlers show warnings only. The loggers keep their level, so a
    run attached to a Prefect server still sends its INFO logs to the API (the UI's run page)."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(max(handler.level, logging.WARNING))


def run_refresh(params: RefreshParams, quiet: bool = False) -> dict:
    """Run the flow in this process (Prefect's local mode unless PREFECT_API_URL points at a server).

    In local mode Prefect first starts a temporary API server. Under load it can miss its start
    timeout (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, 120 s here): nothing of the run has
    started then, so the start is tried once more before the run fails with what to do about it."""
    import sys

    from flows.local_server import forget_local_server, reap_orphaned_local_server

    if quiet:
        quiet_console()
    settings = settings_for(params)
    if (orphan := reap_orphaned_local_server(settings.home)) is not None:
        print(
            f"stopped the temporary Prefect server (pid {orphan}) a killed refresh had left running",
            file=sys.stderr,
        )
    token = _RESOLVED.set((params.model_dump_json(), settings))
    try:
        for attempt in (1, 2):
            try:
                summary = refresh_flow(settings)(params)
                break
            except RuntimeError as exc:
                if _EPHEMERAL_TIMEOUT not in str(exc):
                    raise
                if attempt == 2:
                    raise RuntimeError(
                        "Prefect's local API server did not start in time, twice (is the machine "
                        "overloaded?); nothing was run. Set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
                        "higher, or PREFECT_API_URL to a running Prefect server."
                    ) from exc
                print(
                    "Prefect's local API server did not start in time; trying once more (nothing was run)",
                    file=sys.stderr,
                )
    finally:
        _RESOLVED.reset(token)
    forget_local_server(settings.home)  # finished: Prefect stops its server at exit
    return {**EMPTY_FIELDS, **summary}
