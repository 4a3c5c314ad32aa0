"""The promote stage: the gate's decision on a version's saved scores, recorded in the registry; and an
operator's promotion or rollback (``moral promote`` / ``moral rollback`` and the ``rollback-adapter``
flow).

Order of work for the operator's two, so that a refusal changes nothing: read what the change would
be (no writes), verify the target's files against the checksum the registry recorded, then make the
change in one registry transaction that refuses if the champion moved in between.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from storage.artifacts import ArtifactError, verify_uri
from storage.home import scores_path
from storage.registry import Registry, RegistryError, format_version
from storage.settings import Settings
from tasks.stages.progress import Progress, say


@dataclass
class PromoteSummary:
    version: int
    decision: str
    reasons: list[str]


def gate_decision(settings: Settings, version: int):
    """The gate's decision on a version's saved scores (pure: nothing is recorded) and its reasons,
    with the note on an unusable champion first; also used to preview a decision awaiting approval."""
    from tasks.gate import GateThresholds, decide

    path = scores_path(settings, version)
    if not path.exists():
        raise FileNotFoundError(f"v{version} has no saved evaluation ({path}): run the evaluate stage first")
    saved = json.loads(path.read_text())
    decision = decide(
        saved["scores"], GateThresholds.from_settings(settings), has_champion=saved["has_champion"]
    )
    reasons = ([saved["champion_note"]] if saved.get("champion_note") else []) + decision.reasons
    return saved, decision, reasons


def promote_stage(
    settings: Settings, run_id: str, version: int, progress: Progress | None = None
) -> PromoteSummary:
    """Apply the gate to the stored scores; record the decision and move the champion alias if promoted."""
    reg = Registry.from_settings(settings)
    saved, decision, reasons = gate_decision(settings, version)
    reg.set_version_metrics(
        version, {"evaluation": saved["means"], "sizes": saved["sizes"], "gate": decision.to_dict()}
    )
    if decision.override:  # audited: who weakened the gate for which version, and why
        reg.log_event(
            "gate.override",
            version=version,
            run_id=run_id,
            actor="gate",
            detail={"reason": decision.override, "weakened": settings.gate_weakened()},
        )
    reg.decide_version(version, decision.status, reasons, actor="gate", run_id=run_id)
    say(progress, f"promote: v{version} {decision.status}")
    for r in reasons:
        say(progress, f"  {r}")
    return PromoteSummary(version, decision.status, reasons)


class OperationRefused(RuntimeError):
    """A promotion or rollback was refused; the registry is unchanged."""


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
