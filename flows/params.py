"""The refresh flow's parameters: one pydantic model, so the Prefect UI's Run form shows every field
with its description and default, and the CLI builds the same object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Stage = Literal["ingest", "qa", "index", "train", "evaluate"]


class RefreshParams(BaseModel):
    """Parameters of one knowledge refresh. Unset fields fall back to the ``MORAL_*`` settings."""

    source: str = Field(
        "examples/docs", description="Folder of documents to ingest (PDF, Markdown, text, HTML)."
    )
    home: str | None = Field(
        None,
        description="Data home of this run; `moral deploy` fills in its own, absolute, so every run of a "
        "deployment uses the same one. Empty: MORAL_HOME.",
    )
    until: Stage | None = Field(
        None,
        description="Stop after this stage (ingest, qa, index, train, evaluate); a later run picks up from there.",
    )
    qa_backend: Literal["local", "openai"] | None = Field(
        None, description="QA generator: 'local' (bundled model) or 'openai' (endpoint from settings)."
    )
    epochs: int | None = Field(None, ge=1, description="Training epochs (default: MORAL_EPOCHS).")
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate (default: MORAL_LEARNING_RATE)."
    )
    num_experts: int | None = Field(None, ge=1, description="LoRA experts per adapted linear.")
    top_k: int | None = Field(None, ge=1, description="Experts per token.")
    holdout_size: int | None = Field(
        None, ge=0, description="FanOutQA world-knowledge holdout size (0 needs gate_override)."
    )
    drift_size: int | None = Field(
        None, ge=0, description="General prompts measuring drift from the base model (0 needs gate_override)."
    )
    gate_min_gain: float | None = Field(
        None, description="Minimum paraphrase strict-recall gain to promote (negative needs gate_override)."
    )
    gate_min_n: int | None = Field(
        None, ge=1, description="Fewer paraphrase questions than this: rejected, too few to decide."
    )
    gate_max_nll_rise: float | None = Field(
        None, ge=0, description="Max relative world-knowledge NLL rise (upper 95% bound)."
    )
    gate_max_drift: float | None = Field(
        None, ge=0, description="Max relative drift on general prompts (upper 95% bound)."
    )
    gate_max_retention_drop: float | None = Field(
        None, ge=0, description="Max domain-retention strict-recall drop (upper 95% bound)."
    )
    gate_override: str | None = Field(
        None,
        description="Reason for running with a gate check weakened or off (audited, shown with every "
        "decision of the version).",
    )
    fivel_size: int | None = Field(None, ge=0, description="Items per 5L-bench suite (0 disables them).")
    require_approval: bool | None = Field(
        None,
        description="Pause before promotion until someone resumes the run in the Prefect UI (needs a "
        "Prefect server; a local run without one leaves the version a candidate 'awaiting approval').",
    )
    approval_timeout_s: int | None = Field(
        None, ge=1, description="Seconds a paused run waits for approval before leaving a candidate."
    )
    replay_budget: int | None = Field(
        None, ge=0, description="Earlier train pairs replayed with the delta (0 disables replay)."
    )
    bank_init: bool | None = Field(
        None, description="Initialise experts from the adapter bank (default: MORAL_BANK_INIT, on)."
    )
    loramoe: bool | None = Field(
        None, description="LoRAMoE mode: localized balancing over new vs retained expert groups."
    )
    max_llm_calls: int | None = Field(None, ge=0, description="Per-run cap on LLM calls for QA generation.")
    max_llm_tokens: int | None = Field(None, ge=0, description="Per-run cap on LLM tokens for QA generation.")

    def overrides(self) -> dict:
        """The settings this run overrides (fields left unset are not included)."""
        keys = {
            "qa_backend", "epochs", "learning_rate", "num_experts", "top_k", "holdout_size", "drift_size",
            "gate_min_gain", "gate_min_n", "gate_max_nll_rise", "gate_max_drift", "gate_max_retention_drop",
            "gate_override", "max_llm_calls", "max_llm_tokens", "replay_budget", "bank_init", "loramoe",
            "fivel_size", "require_approval", "approval_timeout_s",
            "home",
        }  # fmt: skip
        return {k: v for k, v in self.model_dump().items() if k in keys and v is not None}


class RollbackParams(BaseModel):
    """Parameters of the ``rollback-adapter`` flow (the UI's Run form shows these)."""

    to: str | None = Field(
        None,
        description="Version to roll back to (e.g. v3). Empty: the previous promoted champion.",
        pattern=r"^\s*[vV]?\d+\s*$",
    )
    reason: str = Field(
        "rollback from the Prefect UI",
        min_length=1,
        description="Why; written to the registry's audit log with the flow run id.",
    )
    actor: str | None = Field(None, description="Who asked for it (default: the flow's name).")
    home: str | None = Field(
        None, description="Data home; `moral deploy` fills in its own, absolute. Empty: MORAL_HOME."
    )
