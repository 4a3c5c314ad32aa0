"""Answering with the champion adapter (or a named version, or the base model): shared by `moral ask`
and `moral serve`.

The base model is loaded from disk once per process.  Each adapter version gets its own module tree
built by copying the base model's modules while *sharing* its parameter and buffer tensors, so a loaded
version costs only its adapter weights, the base stays pristine (MoRAL wraps linears in place), and
switching the champion never reloads or re-converts the base model.

A version is loaded only after two checks: it was trained on this base model (the registry's recorded
base checksum, and the adapter config's, must match) and its files match the checksum the registry
recorded (storage.artifacts).  Either failure raises :class:`VersionNotLoadable`.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.registry import Registry, RegistryError, RegistryLockedError, Version, parse_version
from storage.settings import Settings, get_settings

BASE = "base"  # the name under which the bare base model answers (no adapter)
REFUSAL_TTL_S = 60.0


class VersionNotFound(LookupError):
    """No such adapter version in the registry."""


class VersionNotLoadable(RuntimeError):
    """The version exists but cannot be served: another base model, no files, or a checksum mismatch."""


@dataclass(frozen=True)
class Answerer:
    """A model ready to generate, and the name of what answers: 'v3' or 'base'."""

    name: str
    model: Any
    tokenizer: Any
    version: int | None = None


class ModelPool:
    """The base model loaded once plus up to ``max_adapters`` adapter versions built on shared weights."""

    def __init__(self, settings: Settings, max_adapters: int | None = None) -> None:
        from moe.base_model import base_model_identity, load_base_model

        self.settings = settings
        self.base_path, identity = base_model_identity(settings.base_model, settings.model_cache)
        self.base_sha256: str = identity["sha256"]
        self.base_name: str = identity["name"]
        self.base, self.tokenizer = load_base_model(self.base_path)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.max_adapters = max_adapters or settings.serve_cached_adapters
        # (version, artifact sha256) -> adapted model; most recently used last.
        self._loaded: OrderedDict[tuple[int, str], Any] = OrderedDict()
        # Refusals are remembered for a minute, so a broken version is not re-hashed on every request
        # while files restored from a backup are still picked up without a restart.
        self._refused: dict[tuple[int, str | None], tuple[str, float]] = {}
        self._lock = threading.Lock()

    @property
    def base_answerer(self) -> Answerer:
        return Answerer(BASE, self.base, self.tokenizer)

    def loaded_versions(self) -> list[str]:
        with self._lock:
            return [f"v{v}" for v, _ in self._loaded]

    def check(self, v: Version) -> Path:
        """The version's verified adapter directory, or :class:`VersionNotLoadable` with the reason."""
        from storage.artifacts import AdapterStore, ArtifactError

        if why := v.other_base(self.base_sha256):
            raise VersionNotLoadable(f"{why}; it is never loaded")
        if not v.artifact_uri or not v.artifact_sha256:
            raise VersionNotLoadable(f"{v.name} has no adapter files recorded")
        uri = Path(v.artifact_uri)
        try:
            AdapterStore(uri.parent).verify(uri.name, v.artifact_sha256)
        except ArtifactError as exc:
            raise VersionNotLoadable(f"{v.name} cannot be loaded: {exc}") from exc
        return uri

    def get(self, v: Version) -> Answerer:
        """The adapted model of version ``v``, loading (and verifying) it on first use."""
        key = (v.version, v.artifact_sha256 or "")
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return Answerer(v.name, self._loaded[key], self.tokenizer, v.version)
            refused = self._refused.get((v.version, v.artifact_sha256))
            if refused is not None and time.monotonic() - refused[1] < REFUSAL_TTL_S:
                raise VersionNotLoadable(refused[0])
            try:
                model = self._attach(self.check(v))
            except VersionNotLoadable as exc:
                self._refused[(v.version, v.artifact_sha256)] = (str(exc), time.monotonic())
                raise
            except (OSError, ValueError, RuntimeError) as exc:  # unreadable config/weights, shape mismatch
                reason = f"{v.name} cannot be loaded: {exc}"
                self._refused[(v.version, v.artifact_sha256)] = (reason, time.monotonic())
                raise VersionNotLoadable(reason) from exc
            self._loaded[key] = model
            while len(self._loaded) > self.max_adapters:
                self._loaded.popitem(last=False)  # a request still holding it keeps it alive until done
            return Answerer(v.name, model, self.tokenizer, v.version)

    def _attach(self, adapter_dir: Path) -> Any:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        base = self._shared_copy()
        if config.get("adapter_type") == "moral":
            from moe.model import MoRALModel

            # Also checks the base checksum recorded inside the adapter's own config.
            return MoRALModel.from_pretrained(base, adapter_dir, expected_base_sha256=self.base_sha256)
        from moe.model import load_adapter

        return load_adapter(base, adapter_dir)

    def _shared_copy(self) -> Any:
        """New module objects over the same tensors: deepcopy with every parameter and buffer pre-memoised."""
        memo: dict[int, Any] = {id(t): t for t in self.base.parameters()}
        memo.update({id(t): t for t in self.base.buffers()})
        return copy.deepcopy(self.base, memo)


@dataclass
class ChampionWatcher:
    """The registry's champion, looked up at most once per ``poll_s``; a busy registry (another process
    writing) or a missing one never fails a request: the last answer stands until the next look-up."""

    settings: Settings
    poll_s: float = 1.0
    _checked_at: float = field(default=float("-inf"), init=False)
    _champion: Version | None = field(default=None, init=False)
    _registry: Registry | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    last_error: str | None = field(default=None, init=False)

    def registry(self) -> Registry | None:
        """A Registry with a short lock timeout, or None while there is none yet (it is never created here)."""
        if self._registry is None and self.settings.registry_path.exists():
            self._registry = Registry(
                self.settings.registry_path, lock_timeout_s=self.settings.serve_registry_timeout_s
            )
        return self._registry

    def champion(self) -> Version | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self.poll_s:
                return self._champion
            self._checked_at = now
            try:
                reg = self.registry()
                number = reg.champion() if reg is not None else None
                if number is None:
                    self._champion = None
                elif self._champion is None or self._champion.version != number:
                    self._champion = reg.get_version(number)  # type: ignore[union-attr]
                self.last_error = None
            except RegistryError as exc:  # RegistryLockedError included: keep the last answer
                self.last_error = f"registry busy or unreadable, serving the last known champion: {exc}"
            return self._champion


class Engine:
    """What `moral serve` answers with: model resolution by name, retrieval, serialised generation."""

    def __init__(self, settings: Settings, pool: ModelPool | None = None, store: Any = None) -> None:
        self.settings = settings
        self.pool = pool or ModelPool(settings)
        self.watcher = ChampionWatcher(settings, poll_s=settings.serve_poll_s)
        self.generate_lock = threading.Lock()  # one model on the CPU: one generation at a time
        self.champion_error: str | None = None
        self._pinned: dict[int, Version] = {}
        self._store = store  # a storage.vectors.VectorStore, opened on the first open-book request
        self._store_lock = threading.Lock()

    def resolve(self, version: str | None) -> Answerer:
        """None: the champion (the base model when there is none or it cannot be loaded); 'base'; or a
        version such as 'v3' / '3' (:class:`VersionNotFound`, :class:`VersionNotLoadable`)."""
        if version is None or version == "champion":
            champion = self.watcher.champion()
            if champion is None:
                self.champion_error = None
                return self.pool.base_answerer
            try:
                answerer = self.pool.get(champion)
            except VersionNotLoadable as exc:
                # Never a foreign or corrupt adapter: the base model answers, and /health says why.
                self.champion_error = str(exc)
                return self.pool.base_answerer
            self.champion_error = None
            return answerer
        if version == BASE:
            return self.pool.base_answerer
        return self.pool.get(self._version_record(version))

    def _version_record(self, version: str) -> Version:
        try:
            number = parse_version(version)
        except RegistryError as exc:
            raise VersionNotFound(str(exc)) from exc
        if number in self._pinned:
            return self._pinned[number]
        reg = self.watcher.registry()
        if reg is None:
            raise VersionNotFound(f"no version v{number}: the registry is empty")
        try:
            record = reg.get_version(number)
        except RegistryLockedError:
            raise
        except RegistryError as exc:
            raise VersionNotFound(str(exc)) from exc
        if record.artifact_sha256:  # files are set once: the record's loading facts never change again
            self._pinned[number] = record
        return record

    def promoted_versions(self) -> list[Version]:
        """Promoted versions of this base model, for /v1/models ([] while the registry is busy or absent)."""
        reg = self.watcher.registry()
        if reg is None:
            return []
        try:
            versions = reg.list_versions(status="promoted")
        except RegistryError:
            return []
        sha = self.pool.base_sha256
        return [v for v in versions if not v.base_model_sha256 or v.base_model_sha256 == sha]

    def retrieve(self, question: str, k: int) -> tuple[str, list[dict]]:
        """(context, sources): the top-k active chunks for ``question`` from the Chroma index."""
        with self._store_lock:
            if self._store is None:
                from storage.vectors import VectorStore

                self._store = VectorStore(self.settings)
            return retrieve_passages(self._store, question, k)


def retrieve_passages(store: Any, question: str, k: int) -> tuple[str, list[dict]]:
    """The open-book context exactly as evaluation builds it (chunks joined by blank lines) and its sources."""
    from storage.vectors import CHUNKS

    hits = store.query(CHUNKS, [question], k=k, where={"status": "active"})[0]
    context = "\n\n".join(h.text for h in hits)
    sources = [{"id": h.id, "path": h.metadata.get("path"), "similarity": h.similarity} for h in hits]
    return context, sources


# ------------------------------------------------------------------------------------ `moral ask`
def load_answering_model(settings: Settings, version: int | str | None = None):
    """(model, tokenizer, version name or None): the named version, else the champion, else the base model.

    Unlike the server, a one-shot question with an unusable champion is an error, not a silent fallback.
    """
    pool = ModelPool(settings, max_adapters=1)
    if version is None:
        reg = Registry.from_settings(settings) if settings.registry_path.exists() else None
        champion = reg.champion() if reg is not None else None
        if champion is None:
            return pool.base, pool.tokenizer, None
        version = champion
    record = Registry.from_settings(settings).get_version(version)
    try:
        answerer = pool.get(record)
    except VersionNotLoadable as exc:
        raise RuntimeError(str(exc)) from exc
    return answerer.model, answerer.tokenizer, answerer.name


def answer_question(
    question: str, version: int | str | None = None, open_book: bool = False, settings: Settings | None = None
) -> dict:
    from moe.infer import generate_answers

    settings = settings or get_settings()
    model, tokenizer, name = load_answering_model(settings, version)
    sources: list[dict] = []
    context = None
    if open_book:
        from storage.vectors import VectorStore

        context, sources = retrieve_passages(VectorStore(settings), question, k=settings.serve_retrieval_k)
    answer = generate_answers(
        model, tokenizer, [question], contexts=[context] if open_book else None, max_new_tokens=64
    )[0]
    return {
        "question": question,
        "answer": answer,
        "version": name,
        "open_book": open_book,
        "sources": sources,
    }
