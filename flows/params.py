"""The refresh flow's parameters: one pydantic model, so the Prefect UI's Run form shows every field
with its description and default, and the CLI builds the same object."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, create_model

from storage.settings import Settings

Stage = Literal["ingest", "qa", "index", "train", "evaluate"]
Until = Literal["all", "ingest", "qa", "index", "train", "evaluate"]
DEFAULT = "default"  # a Literal setting left to MORAL_* (a plain enum in the Run form, not anyOf/null)

#: The settings a run may override, as Prefect UI Run-form fields and `RefreshParams` attributes.
#: Each field's type, bounds and description come from `storage.settings.Settings`; unset (None, or
#: "default" for a choice) means the MORAL_* setting.
RUN_OVERRIDABLE = (
    "qa_backend", "epochs", "learning_rate", "num_experts", "top_k", "holdout_size", "drift_size",
    "gate_min_gain", "gate_min_n", "gate_max_nll_rise", "gate_max_drift", "gate_max_retention_drop",
    "gate_override", "fivel_size", "require_approval", "approval_timeout_s", "replay_budget", "bank_init",
    "loramoe", "max_llm_calls", "max_llm_tokens",
)  # fmt: skip


def _override_field(name: str) -> tuple[Any, Any]:
    """(annotation, Field) of one run-overridable setting, derived from its Settings field."""
    info = Settings.model_fields[name]
    kind = info.annotation
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) is Literal:
        return Literal[(DEFAULT, *get_args(kind))], Field(
            DEFAULT, description=f"{info.description} ('{DEFAULT}': the setting)"
        )
    inner = args[0] if len(args) == 1 else kind  # `int | None` settings keep their inner type
    typed = Annotated[(inner, *info.metadata)] if info.metadata else inner
    return typed | None, Field(None, description=info.description)


class _RunFields(BaseModel):
    """Fields every run has besides the setting overrides."""

    source: str | None = Field(
        None,
        description="Folder of documents to ingest (PDF, Markdown, text, HTML). Empty: MORAL_REFRESH_SOURCE.",
    )
    home: str | None = Field(
        None,
        description="Data home of this run; `moral deploy` fills in its own, absolute, so every run of a "
        "deployment uses the same one. Empty: MORAL_HOME.",
    )
    until: Until = Field(
        "all",
        description="Stop after this stage (ingest, qa, index, train, evaluate); a later run picks up from "
        "there. 'all': the whole refresh.",
    )

    def overrides(self) -> dict:
        """The settings this run overrides (fields left unset are not included)."""
        values = self.model_dump()
        out = {k: v for k in RUN_OVERRIDABLE if (v := values.get(k)) is not None and v != DEFAULT}
        for key, setting in (("home", "home"), ("source", "refresh_source")):
            if values.get(key):
                out[setting] = values[key]
        return out

    @property
    def stop_after(self) -> str | None:
        """The stage to stop after, or None for the whole refresh."""
        return None if self.until == "all" else self.until


RefreshParams = create_model(
    "RefreshParams",
    __base__=_RunFields,
    __doc__="Parameters of one knowledge refresh. Unset fields fall back to the ``MORAL_*`` settings.",
    **{name: _override_field(name) for name in RUN_OVERRIDABLE},
)


class RunRefused(PermissionError):
    """A deployment run asked for a path outside what the deployment allows."""


def check_deployment_paths(
    source: str | None, home: str | None, base: Settings
) -> tuple[str | None, str | None]:
    """Runs started from a deployment (anyone with the Prefect UI can fill in the Run form) may
    ingest only from ``MORAL_ALLOWED_SOURCES`` (default: the deployment's MORAL_REFRESH_SOURCE) and
    write only to the deployment's own data home; symlinks and ``..`` are resolved first.  CLI runs
    are not checked: the operator owns the machine.  Returns (source, home) resolved: the run uses
    these, not the strings it was given, so a link swapped after the check leads nowhere new."""
    resolved_source = resolved_home = None
    if source:
        path = Path(source).expanduser().resolve()
        resolved_source = str(path)
        roots = base.allowed_source_roots()
        if not any(path == root or path.is_relative_to(root) for root in roots):
            raise RunRefused(
                f"source {source!r} is outside the folders this deployment may read "
                f"({', '.join(map(str, roots))}); add it to MORAL_ALLOWED_SOURCES where `moral deploy` runs"
            )
    if home:
        resolved_home = str(Path(home).expanduser().resolve())
        if resolved_home != str(base.home.expanduser().resolve()):
            raise RunRefused(
                f"home {home!r} is not this deployment's data home ({base.home}); a deployment run "
                "writes only to its own (run `moral deploy` with another MORAL_HOME for another one)"
            )
    return resolved_source, resolved_home


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
