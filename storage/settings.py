"""One settings object for the whole project, read once from ``MORAL_*`` environment variables.

Every component takes what it needs from a :class:`Settings` instance passed down to it; nothing
else reads the environment.  ``apply_runtime_env()`` sets the offline defaults that the bundled
models need (no hub look-ups, no telemetry) without overriding what the user set explicitly.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Environment defaults for running offline: hub loads by name fail fast, Chroma sends no telemetry.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    # transformers draws a "Loading weights" bar per model load: a dozen per refresh in the flow log.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Prefect's local (ephemeral) API server gets 20 s to start by default; on a loaded 2-core machine
    # that is not enough and the run dies before it starts.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_runtime_env() -> None:
    """Set the offline defaults in ``os.environ`` unless the user already set them."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


#: Settings holding credentials: never pickled to another process (Settings.without_secrets).
SECRET_FIELDS = ("qa_api_key", "serve_api_key")
#: The marker .env.example puts on every secret a deployment must replace (`moral preflight`).
PLACEHOLDER = "CHANGE-ME"


class Settings(BaseSettings):
    """All settings, with the environment variable that sets each (prefix ``MORAL_``)."""

    model_config = SettingsConfigDict(env_prefix="MORAL_", extra="ignore")

    # --- where things live -------------------------------------------------------------------
    home: Path = Field(Path(".moral"), description="Data home: registry, Chroma, adapters, caches.")
    model_cache: Path = Field(
        Path("~/.cache/moral-refresh/models"),
        description="Machine-wide cache of converted base models, shared by every data home.",
    )
    base_model: str | None = Field(
        None,
        description="Local HF causal-LM directory; unset means the bundled SmolLM2-135M-Instruct.",
    )
    embed_model: str | None = Field(
        None, description="Local sentence-transformers directory; unset means the bundled all-MiniLM-L6-v2."
    )
    chroma_url: str | None = Field(
        None, description="Chroma server URL (HttpClient); unset means a PersistentClient in the data home."
    )
    registry_lock_timeout_s: float = Field(
        60.0, gt=0, description="How long a registry call waits for another process's DuckDB lock."
    )

    # --- QA generation -----------------------------------------------------------------------
    qa_backend: Literal["local", "openai"] = Field(
        "local",
        description="'local' (the bundled model, offline) or 'openai' (any OpenAI-compatible endpoint).",
    )
    qa_base_url: str | None = Field(
        None, description="Endpoint for the openai backend; falls back to OPENAI_BASE_URL."
    )
    qa_api_key: SecretStr | None = Field(
        None, description="API key for the openai backend; falls back to OPENAI_API_KEY."
    )
    qa_model: str | None = Field(None, description="Model name for the openai backend.")
    qa_pairs_per_chunk: int = Field(
        5,
        ge=1,
        le=20,
        description="Facts asked about per chunk; each is asked in qa_wordings_per_fact wordings, so a "
        "chunk yields up to qa_pairs_per_chunk * qa_wordings_per_fact pairs (twice that with the openai "
        "backend's reverse relations).",
    )
    qa_wordings_per_fact: int = Field(
        6,
        ge=1,
        le=12,
        description="Distinct wordings each fact is asked in (other openers, the subject named another "
        "way; the openai backend also asks a relation both ways, as two facts): one wording of a fact teaches it poorly; several, "
        "trained in different sequences, teach it to be recalled in words never trained.",
    )
    qa_concurrency: int = Field(8, ge=1, le=256, description="Concurrent LLM requests (openai backend).")
    qa_timeout_s: float = Field(60.0, gt=0, description="Per-request timeout for the openai backend.")
    qa_max_retries: int = Field(5, ge=0, description="Retries per LLM request on 429/5xx/timeouts.")
    max_llm_calls: int | None = Field(
        None, ge=0, description="Per-run cap on LLM calls; the rest waits for the next run."
    )
    max_llm_tokens: int | None = Field(None, ge=0, description="Per-run cap on LLM tokens.")

    # --- ingestion ---------------------------------------------------------------------------
    chunk_tokens: int = Field(80, ge=16, description="Chunk size in (whitespace) tokens.")
    chunk_overlap: int = Field(16, ge=0, description="Overlap between consecutive chunks, in tokens.")
    max_file_mb: float = Field(50.0, gt=0, description="Files larger than this are quarantined.")
    max_pdf_pages: int = Field(500, ge=1, description="PDFs with more pages are quarantined.")

    # --- dedup -------------------------------------------------------------------------------
    dedup_threshold: float = Field(
        0.95, gt=0, le=1, description="Cosine at or above which two questions are duplicates."
    )
    holdout_questions: Path | None = Field(
        None,
        description='A file of hand-written questions (JSONL with a "question" per line, or one question '
        "per line) kept out of training: a new pair whose question is not far from one of them (the "
        "paraphrase suite's thresholds, answers not compared) is excluded before indexing, with the "
        "reason; pairs indexed earlier stay. `make demo` keeps its questions out so.",
    )

    # --- training ----------------------------------------------------------------------------
    num_experts: int = Field(8, ge=1, description="LoRA experts per adapted linear.")
    top_k: int = Field(2, ge=1, description="Experts each token is routed to.")
    rank: int = Field(8, ge=1, description="LoRA rank of each expert.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling = alpha / rank).")
    epochs: int = Field(
        4,
        ge=1,
        description="Training epochs over the run's examples (each fact is already asked in several "
        "wordings: distinct examples teach more than repeated passes). 4, chosen on dev: on the demo "
        "corpus dev strict recall was still rising at the end of 3 (0.48 -> 0.71 over the last "
        "quarter) and reached 0.86 at 4; see BENCHMARKS.md.",
    )
    learning_rate: float = Field(
        2e-3,
        gt=0,
        description="Peak AdamW learning rate (1e-3 left a fifth of the trained pairs unlearned in "
        "3 epochs; see BENCHMARKS.md).",
    )
    batch_size: int = Field(8, ge=1, description="Training batch size (sequences).")
    warm_start: bool = Field(False, description="Initialise a new version from the champion's weights.")
    replay_budget: int = Field(200, ge=0, description="Earlier train pairs replayed with each new delta.")
    # --- what one training run is made of (tasks.train.build_examples) -------------------------
    mix_passages: int = Field(
        2,
        ge=1,
        le=5,
        description="Passages in an open-book or distractors-only training example (the gold one "
        "counted): each passage costs ~120 trained tokens, so fewer than serving retrieves.",
    )
    mix_open_book: float = Field(
        0.15,
        ge=0,
        le=1,
        description="Share of the new train pairs also trained open-book: the pair's own chunk among "
        "retrieved distractors, the answer on the first line and its supporting sentence on the next.",
    )
    mix_distractors_only: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of the new train pairs also trained with distractor passages only, still "
        "answered with the trained answer (the model learns not to follow an unrelated passage).",
    )
    mix_document_text: bool = Field(
        True,
        description="Train on the text of the new chunks too (loss on the text): facts no pair asks "
        "about can only be learned from it.",
    )
    mix_general: float = Field(
        0.5,
        ge=0,
        le=1,
        description="General prompts answered by the base model itself, per new train pair "
        "(self-distillation replay: keeps general answers where they were; at most replay_general_size).",
    )
    replay_kl: bool = Field(
        True,
        description="Self-distillation replay also asks each general prompt in the plain "
        "Question/Answer format, matched to the base model's whole next-token distribution there "
        "(KL, the adapter disabled): the plain-format knowledge the world check reads stays put.",
    )
    replay_general_size: int = Field(
        120, ge=0, le=400, description="The fixed general prompts self-distillation replay draws from."
    )
    replay_min_distance: float = Field(
        0.1, ge=0, lt=2, description="Replay drops a pair within this cosine distance of one already kept."
    )
    bank_init: bool = Field(
        True,
        description="Initialise experts from the adapter bank (promoted versions' experts and registered "
        "LoRAs) when it is non-empty; a warm start from the champion takes precedence.",
    )
    bank_experts: int = Field(4, ge=1, description="Experts N initialised from the bank (<= num_experts).")
    bank_k: int = Field(8, ge=1, description="Delta dev examples each bank candidate is scored on.")
    bank_pool: int = Field(
        8, ge=1, description="Top-scoring bank candidates among which the most diverse group is chosen."
    )
    loramoe: bool = Field(
        False,
        description="LoRAMoE mode: localized balancing over two expert groups, delta pairs typed as new "
        "knowledge (group 0) and replay pairs as retained knowledge (group 1).",
    )
    seed: int = Field(0, description="Seed for training, splits and sampling.")

    # --- evaluation and the gate ------------------------------------------------------------
    eval_max_new_tokens: int = Field(24, ge=1, description="Tokens generated per evaluation answer.")
    recall_sample: int = Field(30, ge=0, description="Trained pairs re-asked to measure recall.")
    holdout_size: int = Field(
        40, ge=0, le=600, description="FanOutQA world-knowledge holdout sample size (0 needs gate_override)."
    )
    drift_size: int = Field(
        60,
        ge=0,
        le=600,
        description="General prompts (the shipped general instructions, up to half, then FanOutQA "
        "questions outside the holdout) whose base-model answers measure drift (0 needs gate_override; "
        "120 gave the same ±4% interval on the demo corpus: the spread is between prompts' kinds).",
    )
    gate_min_gain: float = Field(
        0.05,
        description="Minimum gain of paraphrase-question strict recall over the champion (or the base) to "
        "promote; the paired 95% lower bound must also be > 0 (negative needs gate_override).",
    )
    gate_min_n: int = Field(
        30, ge=1, description="Fewer paraphrase questions than this: rejected, too few to decide."
    )
    gate_max_nll_rise: float = Field(
        0.10,
        ge=0,
        description="Max relative rise of world-knowledge answer NLL (format-neutral), upper 95% bound.",
    )
    gate_max_drift: float = Field(
        0.02,
        ge=0,
        description="Max relative rise of the NLL of the base model's own answers to general prompts "
        "(drift), upper 95% bound.",
    )
    gate_max_retention_drop: float = Field(
        0.10, ge=0, description="Max drop of domain-retention strict recall, upper 95% bound."
    )
    gate_override: str | None = Field(
        None,
        description="A reason that allows settings which switch a gate check off (audited, shown with "
        "every decision of the version).",
    )
    fivel_size: int = Field(
        12, ge=0, description="Items per 5L-bench suite (Faith, Filter, RR); 0 disables them."
    )
    fivel_distractors: int = Field(
        2, ge=1, description="Distractor passages per Filter/RR item (chunks of other documents)."
    )
    open_book_k: int = Field(3, ge=1, description="Chunks retrieved into the prompt for open-book suites.")
    require_approval: bool = Field(
        False, description="Pause a refresh before promotion until a person resumes it in the Prefect UI."
    )
    approval_timeout_s: int = Field(
        3600, ge=1, description="How long a paused refresh waits for approval before leaving a candidate."
    )

    # --- operations (deployments, housekeeping, scale-out) ----------------------------------
    refresh_source: Path = Field(
        Path("examples/docs"), description="Folder the scheduled refresh ingests (resolved when deploying)."
    )
    allowed_sources: str | None = Field(
        None,
        description="Folders (separated by the OS path separator, ':' on Linux) that runs started from "
        "a deployment, e.g. the Prefect UI's Run form, may ingest from; unset: MORAL_REFRESH_SOURCE only. "
        "CLI runs are not restricted.",
    )

    def allowed_source_roots(self) -> list[Path]:
        """Absolute roots a deployment run's ``source`` must lie in (``allowed_sources``, or the
        scheduled refresh's own folder)."""
        raw = [p for p in (self.allowed_sources or "").split(os.pathsep) if p.strip()]
        return [Path(p).expanduser().resolve() for p in raw] or [self.refresh_source.expanduser().resolve()]

    refresh_hour: int = Field(
        2, ge=0, le=23, description="Hour of the nightly refresh (cron, local to the timezone)."
    )
    refresh_timezone: str = Field(
        "UTC", description="IANA timezone of the nightly schedule, e.g. Europe/Berlin."
    )
    gc_rejected_after_days: float = Field(
        14.0, ge=0, description="`moral gc` deletes files of rejected versions older than this."
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="Prefect task runner for QA generation and embedding fan-out."
    )
    task_runner_workers: int = Field(4, ge=1, description="Threads (or local Dask workers) for the fan-out.")
    dask_address: str | None = Field(
        None,
        description="Dask scheduler address (tcp://host:8786); unset with 'dask' starts a local cluster.",
    )

    @model_validator(mode="after")
    def _gate_meaningful(self) -> Settings:
        if self.gate_override is not None and not self.gate_override.strip():
            raise ValueError("gate_override needs a reason (MORAL_GATE_OVERRIDE='why')")
        if not self.gate_override and (problems := self.gate_weakened()):
            raise ValueError(
                "these settings switch a gate check off or make it meaningless: "
                + "; ".join(problems)
                + ". Set gate_override (MORAL_GATE_OVERRIDE) to a reason to run anyway (audited)."
            )
        return self

    #: Below these sizes a check decides nothing (one question, a handful of prompts); above these
    #: maxima it lets anything through.
    GATE_MIN_N_FLOOR: ClassVar[int] = 30
    FORGETTING_MIN_SIZE: ClassVar[int] = 20
    FORGETTING_MAX_LIMIT: ClassVar[float] = 0.5

    def gate_weakened(self) -> list[str]:
        """The settings that switch a gate check off or make it meaningless, in words."""
        out = []
        if self.gate_min_gain < 0:
            out.append(f"gate_min_gain={self.gate_min_gain} is negative (a worse adapter would pass)")
        if self.gate_min_n < self.GATE_MIN_N_FLOOR:
            out.append(f"gate_min_n={self.gate_min_n} < {self.GATE_MIN_N_FLOOR} decides on too few questions")
        for name, what in (("holdout_size", "world-knowledge forgetting"), ("drift_size", "drift")):
            size = getattr(self, name)
            if size == 0:
                out.append(f"{name}=0 disables the {what} check")
            elif size < self.FORGETTING_MIN_SIZE:
                out.append(
                    f"{name}={size} < {self.FORGETTING_MIN_SIZE} makes the {what} check a point estimate"
                )
        for name in ("gate_max_nll_rise", "gate_max_drift", "gate_max_retention_drop"):
            if getattr(self, name) > self.FORGETTING_MAX_LIMIT:
                out.append(
                    f"{name}={getattr(self, name)} > {self.FORGETTING_MAX_LIMIT} lets any forgetting pass"
                )
        return out

    @field_validator("refresh_timezone", mode="after")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        # A typo here would otherwise surface only when the Prefect server rejects the schedule.
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r} (use an IANA name such as Europe/Berlin)") from exc
        return value

    # --- serving (`moral serve`) --------------------------------------------------------------
    serve_host: str = Field("127.0.0.1", description="Address `moral serve` binds to (loopback by default).")
    serve_port: int = Field(8000, ge=1, le=65535, description="Port `moral serve` listens on.")
    serve_api_key: SecretStr | None = Field(
        None,
        description="When set, every request but /health needs 'Authorization: Bearer <key>' (the "
        "interactive /docs are then off). Required to bind `moral serve` to a non-loopback address.",
    )
    serve_poll_s: float = Field(
        1.0, ge=0, description="At most one registry look-up for the champion per this many seconds."
    )
    serve_registry_timeout_s: float = Field(
        0.5, gt=0, description="How long a champion look-up waits for a busy registry (then: last answer)."
    )
    serve_max_tokens: int = Field(256, ge=1, description="Completion tokens when a request sets none.")
    serve_max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    serve_retrieval_k: int = Field(3, ge=1, le=50, description="Passages retrieved for an open-book request.")
    serve_cached_adapters: int = Field(
        4, ge=1, description="Adapter versions kept loaded at once (the base weights are shared by all)."
    )

    @field_validator("home", "model_cache", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved once, at start, so every stage and every flow run sees the same directories.
        return value.expanduser().resolve()

    @field_validator("holdout_questions", mode="after")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        # Checked at start: a missing file found only by the index stage would come after the LLM spend.
        if value is None:
            return None
        value = value.expanduser().resolve()
        if not value.is_file():
            raise ValueError(f"MORAL_HOLDOUT_QUESTIONS: no such file: {value}")
        return value

    # --- derived paths -----------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.home / "registry.duckdb"

    @property
    def chroma_path(self) -> Path:
        return self.home / "chroma"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    # Files beside the registry, one JSON per version: the evaluation's per-item scores (the gate's
    # input), the training log (loss curve, router statistics), the bank selection, the comparison.
    @property
    def evaluations_dir(self) -> Path:
        return self.home / "evaluations"

    @property
    def training_dir(self) -> Path:
        return self.home / "training"

    @property
    def bank_dir(self) -> Path:
        return self.home / "bank"

    @property
    def compare_dir(self) -> Path:
        return self.home / "compare"

    def resolved_qa_base_url(self) -> str | None:
        return self.qa_base_url or os.environ.get("OPENAI_BASE_URL")

    def resolved_qa_api_key(self) -> str | None:
        if self.qa_api_key is not None:
            return self.qa_api_key.get_secret_value()
        # A copy sent to a worker carries no secret (without_secrets): the worker's own environment does.
        return os.environ.get("MORAL_QA_API_KEY") or os.environ.get("OPENAI_API_KEY")

    def without_secrets(self) -> Settings:
        """This copy with every secret unset, for shipping to other processes (Dask workers pickle
        what they are sent): a worker reads ``MORAL_QA_API_KEY`` / ``OPENAI_API_KEY`` from its
        environment instead."""
        return self.model_copy(update={name: None for name in SECRET_FIELDS})

    def ensure_dirs(self) -> None:
        for path in (self.home, self.adapters_dir, self.reports_dir):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    apply_runtime_env()
    return Settings()
