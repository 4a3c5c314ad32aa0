"""``moral deploy``: serve the project's deployments from one long-running process.

Three deployments, all on the ``prefect.serve`` runner of this process:

- ``knowledge-refresh/nightly``: cron at ``MORAL_REFRESH_HOUR`` in ``MORAL_REFRESH_TIMEZONE``;
- ``knowledge-refresh/manual``: no schedule, the UI's Run button (its form comes from
  :class:`flows.params.RefreshParams`);
- ``rollback-adapter/manual``: the one-step rollback (:class:`flows.params.RollbackParams`).

Each has ``concurrency_limit=1``.  Limits are per deployment, so a nightly and a manual refresh
could still start together; the refresh lock in the data home (:mod:`storage.lock`) is what makes
the second one refuse.  The data home and the source folder are resolved to absolute paths here, at
deploy time and travel with every run as parameter defaults (and in the environment of the served
runs), so a run never depends on the working directory it happens to start in.  Work-pool users
get the same through ``prefect.yaml``'s ``job_variables``.
"""

from __future__ import annotations

import os
from typing import Any

from flows.params import RefreshParams, RollbackParams
from storage.settings import Settings, get_settings

TAGS = ["moral-refresh"]


def nightly_cron(settings: Settings) -> str:
    return f"0 {settings.refresh_hour} * * *"


def deployment_env(settings: Settings) -> dict[str, str]:
    """Environment every deployed run needs so that it sees the same data home as the deployer."""
    env = {"MORAL_HOME": str(settings.home), "MORAL_MODEL_CACHE": str(settings.model_cache)}
    if settings.chroma_url:
        env["MORAL_CHROMA_URL"] = settings.chroma_url
    return env


def build_deployments(settings: Settings | None = None) -> list[Any]:
    """The three ``RunnerDeployment`` objects (not yet applied or served)."""
    from prefect.schedules import Cron

    from flows.refresh import refresh_flow
    from flows.rollback import rollback_adapter_flow

    settings = settings or get_settings()
    knowledge_refresh = refresh_flow(settings)
    source = str(settings.refresh_source.expanduser().resolve())
    home = str(settings.home)
    refresh_defaults = {
        "params": RefreshParams(source=source, home=home).model_dump(mode="json", exclude_none=True)
    }
    common: dict[str, Any] = {"concurrency_limit": 1, "tags": TAGS}
    nightly = knowledge_refresh.to_deployment(
        name="nightly",
        schedules=[Cron(nightly_cron(settings), timezone=settings.refresh_timezone)],
        paused=False,
        parameters=refresh_defaults,
        description=f"Nightly knowledge refresh of {source} into {settings.home}.",
        **common,
    )
    manual = knowledge_refresh.to_deployment(
        name="manual",
        parameters=refresh_defaults,
        description=f"Knowledge refresh on demand (data home {settings.home}).",
        **common,
    )
    rollback = rollback_adapter_flow.to_deployment(
        name="manual",
        parameters={"params": RollbackParams(home=home).model_dump(mode="json", exclude_none=True)},
        description=f"Roll the champion back (data home {settings.home}).",
        **common,
    )
    return [nightly, manual, rollback]


def serve_deployments(settings: Settings | None = None, limit: int = 1) -> None:
    """Register the deployments and run their flow runs from this process until interrupted."""
    from prefect import serve

    from storage.chroma_server import ensure_chroma_server

    settings = settings or get_settings()
    settings.ensure_dirs()
    if not settings.chroma_url:
        # Flow runs (and `moral serve`) share the index through one Chroma server on loopback,
        # never several PersistentClients over one directory.
        settings = settings.model_copy(update={"chroma_url": ensure_chroma_server(settings)})
    # Served runs execute in child processes that inherit this environment.
    os.environ.update(deployment_env(settings))
    # pause_on_shutdown=False: the nightly schedule stays active while the process restarts, and
    # the runs it missed are picked up (as late runs) when it is back.
    serve(*build_deployments(settings), limit=limit, pause_on_shutdown=False)
