"""Rollback and manual promotion, shared by ``moral rollback`` / ``moral promote`` and the
``rollback-adapter`` Prefect flow, plus the Prefect events both emit.

Order of work, so that a refusal changes nothing: read what the change would be (no writes),
verify the target's files against the checksum the registry recorded, then make the change in one
registry transaction that refuses if the champion moved in between.  Events go out afterwards and
never fail the operation: the registry's audit log is the record, the events are for automations.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from flows.params import RollbackParams
from storage.artifacts import ArtifactError, verify_uri
from storage.registry import Registry, RegistryError, format_version
from storage.settings import Settings, get_settings

log = logging.getLogger(__name__)

EVENT_PROMOTED = "moral.adapter.promoted"
EVENT_ROLLED_BACK = "moral.adapter.rolled-back"


class OperationRefused(RuntimeError):
    """A promotion or rollback was refused; the registry is unchanged."""


def cli_actor() -> str:
    """Who ran a CLI command, for the audit log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary uids)
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def current_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # outside a flow run
        return None


def _verified(version: Any) -> None:
    try:
        verify_uri(version.artifact_uri, version.artifact_sha256, label=version.name)
    except ArtifactError as exc:
        raise OperationRefused(f"refused, nothing changed: {exc}") from exc


def rollback_adapter(
    settings: Settings,
    to: int | str | None = None,
    reason: str = "rollback",
    actor: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Move the champion back (to the previous promoted version, or ``to``) after verifying the
    target's files; the version rolled back from becomes ``revoked``."""
    if not reason or not reason.strip():
        raise OperationRefused("a rollback needs a reason (it is written to the audit log)")
    reg = Registry.from_settings(settings)
    try:
        current, target = reg.rollback_target(to)
        _verified(target)
        done = reg.rollback(
            to=target.version, actor=actor, reason=reason, run_id=run_id, expect_from=current.version
        )
    except RegistryError as exc:
        raise OperationRefused(f"refused, nothing changed: {exc}") from exc
    return {
        "operation": "rollback",
        "from": format_version(done.from_version),
        "to": format_version(done.to_version),
        "revoked": format_version(done.from_version),
        "champion": format_version(done.to_version),
        "reason": reason,
        "actor": actor,
        "flow_run_id": run_id,
    }


def promote_version(
    settings: Settings,
    version: int | str,
    reason: str,
    force: bool = False,
    actor: str | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """An operator's promotion (``force`` for a rejected or revoked version), after verifying its files."""
    reg = Registry.from_settings(settings)
    try:
        target = reg.get_version(version)
        previous = reg.champion()
        _verified(target)
        done = reg.promote(target.version, actor=actor, reason=reason, force=force, run_id=run_id)
    except RegistryError as exc:
        raise OperationRefused(f"refused, nothing changed: {exc}") from exc
    return {
        "operation": "promote",
        "version": done.name,
        "from_status": target.status,
        "previous_champion": format_version(previous) if previous else None,
        "champion": done.name,
        "forced": force,
        "reason": reason,
        "actor": actor,
        "flow_run_id": run_id,
    }


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
