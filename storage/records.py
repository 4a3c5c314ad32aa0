"""Plain records the registry returns and accepts, and the deterministic ids they are keyed by.

Ids are hashes of content so that re-running a stage on the same input produces the same rows
(inserts become no-ops), and so that Chroma and DuckDB agree on ids without talking to each other.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from storage.text import fact_key, normalize_question

DocStatus = Literal["active", "retired", "quarantined"]
QAStatus = Literal["active", "duplicate", "excluded", "retired", "superseded"]
Split = Literal["train", "dev", "eval"]
VersionStatus = Literal["candidate", "promoted", "rejected", "revoked"]
VersionKind = Literal["moral", "lora"]
EvalModel = Literal["base", "champion", "candidate"]
EvalMode = Literal["closed", "open"]


class RegistryError(RuntimeError):
    """An illegal registry operation (unknown version, forbidden transition, ...)."""


class RegistryLockedError(RegistryError):
    """Another process held the DuckDB file for longer than the lock timeout."""


# --- ids and normalisation ------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed (documents may be large PDFs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _id_text(text: str) -> str:
    """The text a ``qa_id`` hashes. Ids are identifiers, not comparisons: this formula is frozen
    because ids are stored in the registry, the lineage, Chroma and training-artifact keys. What
    counts as the same answer or question is :mod:`storage.text`'s business."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _NON_WORD.sub(" ", text).strip()


def _hash_fields(*parts: object) -> str:
    # \x1f (unit separator) cannot occur in normalised text, so field boundaries are unambiguous.
    return sha256_bytes("\x1f".join(str(p) for p in parts).encode("utf-8"))


def chunk_id_for(doc_id: str, idx: int, text: str) -> str:
    return _hash_fields(doc_id, idx, text)


def qa_id_for(question: str, answer: str, chunk_id: str) -> str:
    return _hash_fields(_id_text(question), _id_text(answer), chunk_id)


def fact_id_for(doc_id: str, answer: str) -> str:
    """The fact a pair asks about: its document and the value of its answer (``storage.text.fact_key``)."""
    return _hash_fields("fact", doc_id, fact_key(answer))[:32]


def parse_version(value: int | str) -> int:
    """``3``, ``"3"``, ``"v3"`` -> ``3``; anything else raises :class:`RegistryError`."""
    if isinstance(value, bool):
        raise RegistryError(f"not a version: {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[vV]?\d+\s*", value):
        number = int(value.strip().lstrip("vV"))
    else:
        raise RegistryError(f"not a version: {value!r} (expected a number such as 3 or 'v3')")
    if number < 1:
        raise RegistryError(f"not a version: {value!r} (versions start at 1)")
    return number


def format_version(version: int) -> str:
    return f"v{version}"


# --- records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    run_id: str
    flow_run_id: str | None
    started_at: datetime
    finished_at: datetime | None
    status: str
    params: dict[str, Any] | None
    summary: dict[str, Any] | None


@dataclass(frozen=True)
class Document:
    doc_id: str
    path: str
    source_root: str | None
    kind: str | None
    size: int | None
    status: DocStatus
    reason: str | None
    first_run: str | None
    last_run: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class QuarantineEntry:
    id: int
    path: str
    sha256: str | None
    reason: str
    run_id: str | None
    created_at: datetime
    resolved: bool


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    idx: int
    text: str
    page: int | None = None
    n_tokens: int | None = None
    status: Literal["active", "retired"] = "active"
    qa_done: bool = False
    run_id: str | None = None
    created_at: datetime | None = None
    qa_fingerprint: str | None = None  # the generation that made its pairs (``tasks.qa.fingerprint``)

    @classmethod
    def new(
        cls,
        doc_id: str,
        idx: int,
        text: str,
        page: int | None = None,
        n_tokens: int | None = None,
        run_id: str | None = None,
    ) -> Chunk:
        """A chunk with its deterministic id."""
        return cls(chunk_id_for(doc_id, idx, text), doc_id, idx, text, page, n_tokens, run_id=run_id)


@dataclass(frozen=True)
class QAPair:
    qa_id: str
    chunk_id: str
    doc_id: str
    question: str
    answer: str
    split: Split
    status: QAStatus = "active"
    duplicate_of: str | None = None
    generator: str | None = None
    prompt_version: str | None = None
    run_id: str | None = None
    created_at: datetime | None = None
    fact_id: str = ""

    def __post_init__(self) -> None:
        if not self.fact_id:
            object.__setattr__(self, "fact_id", fact_id_for(self.doc_id, self.answer))

    @classmethod
    def new(
        cls,
        chunk_id: str,
        doc_id: str,
        question: str,
        answer: str,
        split: Split,
        generator: str | None = None,
        prompt_version: str | None = None,
        run_id: str | None = None,
    ) -> QAPair:
        """A pair with its deterministic id (normalised question + answer + chunk)."""
        return cls(
            qa_id_for(question, answer, chunk_id),
            chunk_id,
            doc_id,
            question,
            answer,
            split,
            generator=generator,
            prompt_version=prompt_version,
            run_id=run_id,
        )

    @property
    def question_norm(self) -> str:
        return normalize_question(self.question)


@dataclass(frozen=True)
class QAFailure:
    chunk_id: str
    error: str | None
    attempts: int
    run_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CacheEntry:
    key: str
    response: Any
    model: str | None = None
    prompt_version: str | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class Version:
    version: int
    run_id: str | None
    parent_version: int | None
    base_model: str | None
    base_model_sha256: str | None
    data_hash: str | None
    params: dict[str, Any] | None
    metrics: dict[str, Any] | None
    artifact_uri: str | None
    artifact_sha256: str | None
    status: VersionStatus
    decision_reasons: list[str]
    kind: VersionKind
    created_at: datetime
    updated_at: datetime
    is_champion: bool = False

    @property
    def name(self) -> str:
        return format_version(self.version)

    def other_base(self, base_sha256: str) -> str | None:
        """Why this version's adapter must not be loaded on the base model ``base_sha256`` (it was
        trained on another one), or None when it fits.  Train, compare and serve all ask this."""
        if self.base_model_sha256 and self.base_model_sha256 != base_sha256:
            return (
                f"{self.name} was trained on another base model (sha256 {self.base_model_sha256[:12]}..., "
                f"configured {base_sha256[:12]}...)"
            )
        return None


@dataclass(frozen=True)
class Rollback:
    from_version: int
    to_version: int


@dataclass(frozen=True)
class Evaluation:
    version: int | None
    model: EvalModel
    suite: str
    mode: EvalMode
    metric: str
    value: float | None
    n: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    run_id: str | None = None
    created_at: datetime | None = None
    id: int | None = None


@dataclass(frozen=True)
class Event:
    id: int
    at: datetime
    kind: str
    version: int | None
    run_id: str | None
    actor: str | None
    detail: dict[str, Any] = field(default_factory=dict)
