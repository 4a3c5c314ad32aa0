"""`moral serve`: an OpenAI-compatible chat endpoint that always answers with the champion.

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` sends server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``.

Model names: ``moral-refresh`` is the base model plus the current champion adapter (the bare base model
while there is none); ``moral-refresh@v3`` pins version 3; ``moral-refresh@base`` is the base model.  The
version that answered is in the response's ``model`` field (``moral-refresh@v3``) and in the
``X-Moral-Adapter-Version`` header (``v3`` or ``base``).  Open-book answers retrieve passages from the
Chroma index when the body carries ``"moral": {"open_book": true, "k": 3}`` (``extra_body`` in the
``openai`` client); the passages used come back in the response's ``moral.sources``.

The champion is looked up in the registry at most once per ``MORAL_SERVE_POLL_S``, so a promotion or a
rollback is served from the next request on, with no restart.  With ``MORAL_SERVE_API_KEY`` set, every
``/v1`` request needs ``Authorization: Bearer <key>``; ``/health`` stays open for container health checks.
Errors use OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``.

One file (~540 lines) because it is one concept, the HTTP surface of the OpenAI wire format: request
models, error shapes, streaming and routes are read together; what answers (versions, loading,
retrieval) is in :mod:`server.model`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from server.model import BASE, Answerer, Engine, VersionNotFound, VersionNotLoadable
from storage.registry import RegistryLockedError
from storage.settings import PLACEHOLDER, Settings

MODEL_ID = "moral-refresh"
VERSION_HEADER = "X-Moral-Adapter-Version"


# ------------------------------------------------------------------------------------------ request
class MoralOptions(BaseModel):
    """The project's own request options, sent as the body field ``moral``."""

    model_config = ConfigDict(extra="forbid")
    open_book: bool = Field(False, description="Retrieve passages from the index into the prompt.")
    k: int | None = Field(
        None, ge=1, le=50, description="Passages to retrieve (default MORAL_SERVE_RETRIEVAL_K)."
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Plain text; a content list may hold text parts only (this model reads no images or audio)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400, f"only text content parts are supported, got {part.get('type')!r}", "messages"
                )
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions body that a local causal LM can honour; other OpenAI
    fields (penalties, logit_bias, user, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    moral: MoralOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops or None


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status >= 500:
            return "server_error"
        return "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def parse_model(name: str) -> str | None:
    """'moral-refresh' -> None (the champion); 'moral-refresh@v3' -> 'v3'; '...@base' -> 'base'."""
    head, sep, pin = name.strip().partition("@")
    if head != MODEL_ID or (sep and not pin):
        raise ApiError(
            404,
            f"The model '{name}' does not exist; use '{MODEL_ID}' (the champion), '{MODEL_ID}@vN' or "
            f"'{MODEL_ID}@{BASE}'",
            "model",
            "model_not_found",
        )
    if not sep or pin == "champion":
        return None
    return pin


def served_name(answerer: Answerer) -> str:
    return f"{MODEL_ID}@{answerer.name}"


# ---------------------------------------------------------------------------------------- prompting
def build_chat_prompt(
    engine: Engine, answerer: Answerer, request: ChatRequest
) -> tuple[list[int], dict[str, Any]]:
    """(prompt ids, the response's ``moral`` block).  A single user turn (after an optional system turn)
    becomes byte-for-byte the prompt `moe.infer.build_prompt` makes for training and evaluation; open-book
    rewrites the last user turn the same way, with the retrieved passages."""
    from moe.infer import build_messages

    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
    ]
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", "messages")
    options = request.moral or MoralOptions()
    extra: dict[str, Any] = {"version": answerer.name, "open_book": options.open_book, "sources": []}
    if options.open_book:
        question = messages[-1]["content"]
        k = options.k or engine.settings.serve_retrieval_k
        context, extra["sources"] = engine.retrieve(question, k)
        messages[-1] = build_messages(question, context or None)[-1]
    tokenizer = answerer.tokenizer
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids, extra


# --------------------------------------------------------------------------------------- generation
@dataclass
class Detokenizer:
    """Turns generated ids into text pieces: waits out half a UTF-8 character and holds back text that
    could be the start of a stop string, so a stream never shows what the final answer cuts off."""

    tokenizer: Any
    stops: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    stopped: bool = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            return ""
        self._settle(text)
        text = self.text
        safe = len(text) if self.stopped else len(text) - self._holdback(text)
        piece = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return piece

    def _holdback(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _settle(self, text: str) -> None:
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text

    def rest(self) -> str:
        """After the last token: the text not sent yet, an unfinished character included (as the
        non-streaming answer shows it)."""
        if not self.stopped:
            self._settle(self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip())
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def token_limit(engine: Engine, answerer: Answerer, prompt_ids: list[int], request: ChatRequest) -> int:
    """The request's completion budget, checked against the server's cap and the model's context window."""
    settings = engine.settings
    limit = request.max_completion_tokens or request.max_tokens or settings.serve_max_tokens
    if limit > settings.serve_max_tokens_limit:
        raise ApiError(400, f"max_tokens is at most {settings.serve_max_tokens_limit}", "max_tokens")
    window = getattr(answerer.model.config, "max_position_embeddings", None)
    if window and len(prompt_ids) + limit > window:
        raise ApiError(
            400,
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({limit}) exceeds the model's "
            f"context of {window} tokens",
            "messages",
            "context_length_exceeded",
        )
    return limit


def run_generation(
    engine: Engine,
    answerer: Answerer,
    prompt_ids: list[int],
    request: ChatRequest,
    on_text: Callable[[str], None] | None = None,
    cancelled: threading.Event | None = None,
) -> Completion:
    """Generate under the engine's lock, passing text pieces to ``on_text`` as they are decoded."""
    from moe.infer import generate_tokens

    limit = token_limit(engine, answerer, prompt_ids, request)
    detok = Detokenizer(answerer.tokenizer, list(request.stop or []))

    def on_token(token: int) -> bool:
        piece = detok.push(token)
        if piece and on_text is not None:
            on_text(piece)
        return not detok.stopped and not (cancelled is not None and cancelled.is_set())

    temperature = 0.0 if request.temperature is None else request.temperature
    with engine.generate_lock:
        if request.seed is not None and temperature > 0:
            import torch

            torch.manual_seed(request.seed)  # under the lock: no other request draws from the RNG meanwhile
        ids, finish = generate_tokens(
            answerer.model,
            answerer.tokenizer,
            prompt_ids,
            max_new_tokens=limit,
            temperature=temperature,
            top_p=request.top_p or 1.0,
            on_token=on_token,
        )
    tail = detok.rest()
    if tail and on_text is not None:
        on_text(tail)
    return Completion(detok.text.rstrip(), finish, len(prompt_ids), len(ids))


# ------------------------------------------------------------------------------------------- the app
#: Routes that need no key when one is set: the container health check.
OPEN_PATHS = frozenset({"/health"})


class ServeConfigError(ValueError):
    """`moral serve` would start in an unsafe way (e.g. reachable from other hosts without a key)."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, 'localhost')."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(settings: Settings, host: str) -> None:
    """Refuse a non-loopback bind without an API key: anyone who reaches the port could use the model
    and read the index's passages through open-book answers."""
    key = settings.serve_api_key.get_secret_value() if settings.serve_api_key else None
    if key is not None and PLACEHOLDER in key:
        raise ServeConfigError(
            f"MORAL_SERVE_API_KEY is still the {PLACEHOLDER} placeholder from .env.example: set a real key"
        )
    if key is None and not is_loopback(host):
        raise ServeConfigError(
            f"refusing to serve on {host!r} without an API key: that address is reachable from other "
            "machines. Set MORAL_SERVE_API_KEY (clients send 'Authorization: Bearer <key>'), or bind "
            "to 127.0.0.1 and put an authenticating proxy in front."
        )


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app over one :class:`Engine` (built here, loading the base model, unless given)."""
    engine = engine or Engine(settings)
    api_key = settings.serve_api_key.get_secret_value() if settings.serve_api_key else None
    # With a key, the interactive docs are off (a browser cannot send the bearer header they would
    # need) and the schema sits behind the key like /v1: the key guards every route but /health.
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None}
    app = FastAPI(
        title="MoRAL Refresh",
        description="OpenAI-compatible endpoint serving the champion adapter.",
        **docs,
    )
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return ApiError(400, message, ".".join(loc) or None).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()
            ):
                return ApiError(401, "Incorrect or missing API key (Authorization: Bearer <key>)", None,
                                "invalid_api_key").response()  # fmt: skip
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        champion = await run_in_threadpool(engine.watcher.champion)
        return {
            "status": "ok",
            "base_model": engine.pool.base_name,
            "base_model_sha256": engine.pool.base_sha256,
            "champion": champion.name if champion else None,
            "champion_error": engine.champion_error,
            "registry_error": engine.watcher.last_error,
            "loaded": engine.pool.loaded_versions(),
        }

    def model_card(name: str, created: float) -> dict:
        return {"id": name, "object": "model", "created": int(created), "owned_by": MODEL_ID}

    @app.get("/v1/models")
    async def list_models() -> dict:
        versions = await run_in_threadpool(engine.promoted_versions)
        now = time.time()
        cards = [model_card(MODEL_ID, now), model_card(f"{MODEL_ID}@{BASE}", now)]
        cards += [model_card(f"{MODEL_ID}@{v.name}", v.created_at.timestamp()) for v in versions]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        await run_in_threadpool(_resolve, parse_model(model))
        return model_card(model, time.time())

    def _resolve(pin: str | None) -> Answerer:
        try:
            return engine.resolve(pin)
        except VersionNotFound as exc:
            raise ApiError(404, f"The model '{MODEL_ID}@{pin}' does not exist: {exc}", "model",
                           "model_not_found") from exc  # fmt: skip
        except VersionNotLoadable as exc:
            raise ApiError(400, str(exc), "model", "model_not_loadable") from exc
        except RegistryLockedError as exc:
            raise ApiError(503, f"the registry is busy, retry shortly: {exc}", None, "registry_busy") from exc

    def _prepare(request: ChatRequest) -> tuple[Answerer, list[int], dict]:
        if request.n != 1:
            raise ApiError(400, "n must be 1 (one model on the CPU generates one choice)", "n")
        answerer = _resolve(parse_model(request.model))
        ids, extra = build_chat_prompt(engine, answerer, request)
        token_limit(engine, answerer, ids, request)  # refused before a stream starts, as a plain HTTP 400
        return answerer, ids, extra

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        answerer, prompt_ids, extra = await run_in_threadpool(_prepare, request)
        headers = {VERSION_HEADER: answerer.name}
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = served_name(answerer)
        if not request.stream:
            done = await run_in_threadpool(run_generation, engine, answerer, prompt_ids, request)
            body = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.text},
                        "finish_reason": done.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": done.usage(),
                "moral": extra,
            }
            return JSONResponse(body, headers=headers)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = _stream(
            engine, answerer, prompt_ids, request, completion_id, created, model, extra, include_usage
        )
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )

    return app


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(
    engine: Engine,
    answerer: Answerer,
    prompt_ids: list[int],
    request: ChatRequest,
    completion_id: str,
    created: int,
    model: str,
    extra: dict,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks as they are decoded, a finish chunk, optionally a
    usage chunk, then ``[DONE]``.  Generation runs in its own thread; a client that goes away sets
    ``cancelled``, which stops generation at the next token and frees the model for the next request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def chunk(delta: dict, finish: str | None = None, **more: Any) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice], **more}  # fmt: skip

    def worker() -> None:
        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        try:
            done = run_generation(engine, answerer, prompt_ids, request, lambda t: put("text", t), cancelled)
            put("done", done)
        except ApiError as exc:
            put("error", exc)
        except Exception as exc:  # the stream has started: report in-band instead of dropping the connection
            put("error", ApiError(500, f"generation failed: {exc}"))

    thread = threading.Thread(target=worker, name="moral-serve-generate", daemon=True)
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}, moral=extra))
        thread.start()
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield _sse(chunk({"content": value}))
            elif kind == "error":
                yield _sse(value.body())
                break
            else:
                yield _sse(chunk({}, value.finish_reason))
                if include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [], "usage": value.usage()})  # fmt: skip
                break
        yield _sse("[DONE]")
    finally:
        cancelled.set()


def run_server(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Load the base model (and, lazily, the champion) and serve until interrupted."""
    import uvicorn

    from storage.chroma_server import ensure_chroma_server

    host = host or settings.serve_host
    check_bind(settings, host)  # before any model or Chroma server is started
    if not settings.chroma_url:
        # A long-lived reader of the index: share the data home's Chroma server on loopback (started
        # here when `moral deploy` has not) instead of opening a second PersistentClient on its files.
        settings = settings.model_copy(update={"chroma_url": ensure_chroma_server(settings)})
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port or settings.serve_port, log_level="info")
