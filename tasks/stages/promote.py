"""The promote stage: the gate's decision on a version's saved scores, recorded in the registry."""

from __future__ import annotations

import json
from dataclasses import dataclass

from storage.home import scores_path
from storage.registry import Registry
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
