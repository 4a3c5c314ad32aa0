"""The ``rollback-adapter`` Prefect flow and the Prefect events that a promotion or a rollback emits.

The operations themselves (``promote_version``, ``rollback_adapter``) live with the promote stage in
:mod:`tasks.stages.promote`, shared by this flow and ``moral promote`` / ``moral rollback``.  Events go
out after the registry change and never fail the operation: the registry's audit log is the record,
the events are for automations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from flows.params import RollbackParams, check_deployment_paths
from storage.settings import Settings, get_settings
from tasks.stages.promote import rollback_adapter

log = logging.getLogger(__name__)

EVENT_PROMOTED = "moral.adapter.promoted"
EVENT_ROLLED_BACK = "moral.adapter.rolled-back"


def deployment_id() -> str | None:
    """The deployment this flow run was started from (a schedule, the UI's Run form, the API), or
    None for a direct call (the CLI)."""
    from prefect.runtime import deployment

    try:
        return str(deployment.id) if deployment.id else None
    except Exception:
        # Fail closed: inside a flow run whose deployment cannot be read, treat it as one.
        return "unknown" if current_flow_run_id() is not None else None


def current_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # outside a flow run
        return None


def emit_adapter_event(
    kind: Literal["promoted", "rolled-back"], version: str, settings: Settings, payload: dict[str, Any]
) -> bool:
    """Emit ``moral.adapter.<kind>`` about ``moral.adapter.<version>``; False when not emitted.

    Emitted inside a flow run, or when a Prefect API is configured (a CLI call with no server would
    otherwise start a temporary one just for the event).  Any failure is logged, never raised: the
    registry change already happened and is recorded in its audit log.
    """
    try:
        from prefect.context import FlowRunContext
        from prefect.events import emit_event
        from prefect.settings import PREFECT_API_URL

        if FlowRunContext.get() is None and not PREFECT_API_URL.value():
            return False
        related = []
        previous = payload.get("previous_champion") or payload.get("from")
        if previous and previous != version:
            related.append(
                {
                    "prefect.resource.id": f"moral.adapter.{previous}",
                    "prefect.resource.role": "previous-champion",
                }
            )
        emitted = emit_event(
            event=f"moral.adapter.{kind}",
            resource={
                "prefect.resource.id": f"moral.adapter.{version}",
                "prefect.resource.name": version,
                "moral.home": str(settings.home),
            },
            related=related,
            payload=payload,
        )
        return emitted is not None
    except Exception as exc:  # events are best effort by design
        log.warning("could not emit moral.adapter.%s for %s: %s", kind, version, exc)
        return False


@flow(
    name="rollback-adapter",
    description="Move the champion back to the previous promoted version (or a named one); the "
    "version rolled back from is revoked. Refuses, changing nothing, when the target's files fail their checksum.",
)
def rollback_adapter_flow(params: RollbackParams = RollbackParams()) -> dict:  # noqa: B008 - immutable default
    settings = get_settings()
    if deployment_id() is not None:  # a run from the UI rolls back only its deployment's home
        _, home = check_deployment_paths(None, params.home, settings)
        params = params.model_copy(update={"home": home})
    if params.home:
        settings = settings.model_copy(update={"home": Path(params.home).expanduser().resolve()})
    result = rollback_adapter(
        settings,
        to=params.to,
        reason=params.reason,
        actor=params.actor or "flow:rollback-adapter",
        run_id=current_flow_run_id(),
    )
    result["event_emitted"] = emit_adapter_event("rolled-back", result["to"], settings, result)
    return result
