"""`moral serve` on loopback, driven by the official `openai` client: the champion answers, a promotion or
a rollback changes who answers without a restart, pins, refusals and errors in OpenAI's shape.

Everything is real: uvicorn in a thread over the tiny local Llama, adapter versions saved by MoRALModel
into the AdapterStore and registered in a DuckDB registry, a second process holding the registry's lock.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr

from bench.serve_load import save_random_version
from moe.base_model import load_base_model
from moe.infer import generate_answers
from moe.model import MoRALModel
from server.app import MODEL_ID, VERSION_HEADER, Detokenizer, create_app
from server.model import Engine, ModelPool
from storage.registry import Registry
from storage.settings import Settings

QUESTION = "What colour is the Zorbl gem?"


@pytest.fixture
def tiny_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    # poll_s=0: every request looks the champion up, so no test needs to wait out the poll interval.
    return settings.model_copy(
        update={"base_model": str(tiny_model_dir), "serve_poll_s": 0.0, "serve_registry_timeout_s": 0.2}
    )


@pytest.fixture
def registry(tiny_settings: Settings) -> Registry:
    return Registry.from_settings(tiny_settings)


def save_version(
    settings: Settings, registry: Registry, seed: int, base_sha256: str | None = None, promote: bool = True
) -> int:
    """A MoRAL adapter with random (seeded, non-zero) experts, registered; promoted by the gate."""
    return save_random_version(
        settings, registry, seed, promote=promote, base_sha256=base_sha256, name="test"
    )


def local_answer(settings: Settings, registry: Registry, version: int | None, max_new_tokens: int) -> str:
    """What `moe.infer.generate_answers` says with that version loaded directly (None: the base model)."""
    base, tokenizer = load_base_model(settings.base_model)
    model = base
    if version is not None:
        model = MoRALModel.from_pretrained(base, Path(registry.get_version(version).artifact_uri))
    return generate_answers(model, tokenizer, [QUESTION], max_new_tokens=max_new_tokens)[0]


@pytest.fixture
def start_server() -> Iterator[Callable[..., str]]:
    """Start the app with uvicorn on a free loopback port in a thread; return its base URL."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings, engine: Engine | None = None) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # the bound socket goes to uvicorn: no race for the port
        config = uvicorn.Config(create_app(settings, engine), log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def ask(client: openai.OpenAI, model: str = MODEL_ID, **kwargs):
    """(completion, the version header) for one question."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, **kwargs
    )
    return raw.parse(), raw.headers[VERSION_HEADER]


@pytest.mark.integration  # a real uvicorn server on loopback
def test_the_champion_answers_and_follows_promotion_and_rollback(tiny_settings, registry, start_server):
    url = start_server(tiny_settings)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    # No champion yet: the base model answers, under the name 'base'.
    done, header = ask(client)
    assert header == "base" and done.model == f"{MODEL_ID}@base"
    assert done.choices[0].message.content == local_answer(tiny_settings, registry, None, 8)
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    v1 = save_version(tiny_settings, registry, seed=1)
    done, header = ask(client)
    assert header == "v1" and done.model == f"{MODEL_ID}@v1"
    expected_v1 = local_answer(tiny_settings, registry, v1, 8)
    assert expected_v1 != local_answer(tiny_settings, registry, None, 8)  # the adapter changes the answer
    assert done.choices[0].message.content == expected_v1

    # Streaming: OpenAI chunks whose text adds up to the same greedy answer, from the same version.
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {f"{MODEL_ID}@v1"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.rstrip() == expected_v1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    v2 = save_version(tiny_settings, registry, seed=2)
    done, header = ask(client)
    assert header == "v2" and done.model == f"{MODEL_ID}@v2"
    assert done.choices[0].message.content == local_answer(tiny_settings, registry, v2, 8)
    ids = {m.id for m in client.models.list()}
    assert {MODEL_ID, f"{MODEL_ID}@base", f"{MODEL_ID}@v1", f"{MODEL_ID}@v2"} <= ids

    registry.rollback(actor="test", reason="v2 misbehaves")
    done, header = ask(client)
    assert header == "v1" and done.choices[0].message.content == expected_v1
    assert f"{MODEL_ID}@v2" not in {m.id for m in client.models.list()}  # revoked: no longer listed

    health = httpx.get(f"{url}/health").json()
    assert health["champion"] == "v1" and health["champion_error"] is None
    assert set(health["loaded"]) == {"v1", "v2"}  # both adapters share the one base model


@pytest.mark.integration  # a real uvicorn server on loopback
def test_pins_unknown_models_and_unloadable_versions(tiny_settings, registry, start_server):
    v1 = save_version(tiny_settings, registry, seed=1)
    v2 = save_version(tiny_settings, registry, seed=2)
    foreign = save_version(tiny_settings, registry, seed=3, base_sha256="f" * 64, promote=False)
    url = start_server(tiny_settings)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    done, header = ask(client, f"{MODEL_ID}@v{v1}")
    assert header == "v1" and done.model == f"{MODEL_ID}@v1"
    assert done.choices[0].message.content == local_answer(tiny_settings, registry, v1, 8)
    assert ask(client)[1] == f"v{v2}"  # the pin did not move the champion
    assert ask(client, f"{MODEL_ID}@base")[1] == "base"

    for name in ("gpt-4o", f"{MODEL_ID}@v99", f"{MODEL_ID}@latest"):
        with pytest.raises(openai.NotFoundError) as err:
            ask(client, name)
        assert (
            err.value.body["code"] == "model_not_found" and err.value.body["type"] == "invalid_request_error"
        )

    with pytest.raises(openai.BadRequestError) as err:
        ask(client, f"{MODEL_ID}@v{foreign}")
    assert (
        err.value.body["code"] == "model_not_loadable" and "another base model" in err.value.body["message"]
    )

    # A champion trained on another base model is never loaded: the base model answers instead.
    registry.promote(foreign, actor="test", reason="operator mistake")
    done, header = ask(client)
    assert header == "base" and done.model == f"{MODEL_ID}@base"
    health = httpx.get(f"{url}/health").json()
    assert health["champion"] == f"v{foreign}" and "another base model" in health["champion_error"]
    assert f"v{foreign}" not in health["loaded"]
    assert f"{MODEL_ID}@v{foreign}" not in {m.id for m in client.models.list()}  # promoted, but not ours

    # Files that no longer match the registry's checksum are refused, not loaded.
    v4 = save_version(tiny_settings, registry, seed=4, promote=False)
    weights = Path(registry.get_version(v4).artifact_uri) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, f"{MODEL_ID}@v{v4}")
    assert "checksum" in err.value.body["message"]

    # Bad request bodies get OpenAI's error shape too.
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL_ID, "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


@pytest.mark.integration  # a real uvicorn server on loopback
def test_an_api_key_is_required_when_configured(tiny_settings, start_server, monkeypatch):
    monkeypatch.setenv("MORAL_SERVE_API_KEY", "s3cret")
    keyed = Settings().model_copy(update={"base_model": tiny_settings.base_model})
    assert keyed.serve_api_key is not None and keyed.home == tiny_settings.home
    url = start_server(keyed)
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        ask(wrong)
    missing = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL_ID, "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    assert MODEL_ID in {m.id for m in client.models.list()}
    assert ask(client)[1] == "base"
    assert httpx.get(f"{url}/health").status_code == 200  # health checks need no key
    # The schema is behind the key too, and the interactive docs are off.
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    keyed_get = httpx.get(f"{url}/openapi.json", headers={"Authorization": "Bearer s3cret"})
    assert keyed_get.status_code == 200 and "/v1/chat/completions" in keyed_get.json()["paths"]
    assert httpx.get(f"{url}/docs").status_code == 401
    assert httpx.get(f"{url}/docs", headers={"Authorization": "Bearer s3cret"}).status_code == 404
    assert httpx.get(f"{url}/redoc", headers={"Authorization": "Bearer s3cret"}).status_code == 404


def test_serving_beyond_loopback_needs_a_real_key(tiny_settings, monkeypatch, capsys):
    """`moral serve --host 0.0.0.0` without a key is refused before anything loads; a key left at the
    .env.example placeholder is refused everywhere."""
    from server.app import ServeConfigError, check_bind, is_loopback, run_server

    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.org", ""]))
    with pytest.raises(ServeConfigError, match="MORAL_SERVE_API_KEY"):
        run_server(tiny_settings, host="0.0.0.0", port=1)  # raises before uvicorn or a model starts
    check_bind(tiny_settings, "127.0.0.1")
    keyed = tiny_settings.model_copy(update={"serve_api_key": SecretStr("s3cret")})
    check_bind(keyed, "0.0.0.0")
    placeholder = tiny_settings.model_copy(update={"serve_api_key": SecretStr("CHANGE-ME-serve-key")})
    with pytest.raises(ServeConfigError, match="placeholder"):
        check_bind(placeholder, "127.0.0.1")
    # Through the CLI: one clear line, exit status 1.
    from cli.main import main

    monkeypatch.setenv("MORAL_HOME", str(tiny_settings.home))
    monkeypatch.delenv("MORAL_SERVE_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "without an API key" in capsys.readouterr().err


@pytest.mark.integration  # a real uvicorn server on loopback
def test_a_busy_registry_keeps_the_loaded_champion(tiny_settings, registry, start_server):
    save_version(tiny_settings, registry, seed=1)
    url = start_server(tiny_settings)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert ask(client)[1] == "v1"

    # Another process opens the registry read-write and keeps it: DuckDB then locks everyone else out.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True); sys.stdin.read()",
         str(tiny_settings.registry_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done, header = ask(client)
        assert header == "v1" and done.choices[0].message.content
        health = httpx.get(f"{url}/health").json()
        assert health["champion"] == "v1" and "registry busy" in health["registry_error"]
    finally:
        holder.communicate(input="", timeout=30)
    ask(client)
    assert httpx.get(f"{url}/health").json()["registry_error"] is None


@pytest.mark.integration  # a real uvicorn server on loopback
def test_open_book_retrieves_passages_from_the_index(tiny_settings, embedder, start_server):
    from storage.vectors import CHUNKS, VectorStore

    store = VectorStore(tiny_settings, embedder)
    store.upsert(
        CHUNKS,
        ["c1", "c2"],
        ["The Zorbl gem is teal and lies in Norvia.", "Brimlow sells lamps on the harbour."],
        [{"status": "active", "path": "gems.md"}, {"status": "active", "path": "shops.md"}],
    )
    url = start_server(tiny_settings, Engine(tiny_settings, ModelPool(tiny_settings), store=store))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    closed, _ = ask(client)
    done, header = ask(client, extra_body={"moral": {"open_book": True, "k": 1}})
    assert header == "base"
    extra = done.model_extra["moral"]
    assert extra["open_book"] is True and [s["path"] for s in extra["sources"]] == ["gems.md"]
    # The passage is in the prompt: the open-book prompt is longer by at least the passage's bytes.
    assert done.usage.prompt_tokens >= closed.usage.prompt_tokens + len("The Zorbl gem is teal")


@pytest.mark.integration  # a real uvicorn server on loopback
def test_max_tokens_and_stop_strings(tiny_settings, start_server):
    url = start_server(tiny_settings)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": QUESTION}], max_tokens=12
    )
    long = raw.choices[0].message.content
    assert raw.choices[0].finish_reason == "length" and raw.usage.completion_tokens == 12
    stop = long[4:6]
    cut = long.find(stop)
    for stream in (False, True):
        result = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12,
            stop=stop,
            stream=stream,
        )
        if stream:
            chunks = list(result)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).rstrip()
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = result.choices[0].message.content, result.choices[0].finish_reason
        assert text == long[:cut].rstrip() and finish == "stop"

    # Sampling (temperature > 0) is repeatable with a seed: the RNG is seeded under the generation lock.
    sampled = [
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12,
            temperature=1.0,
            seed=7,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and sampled[0]


def test_detokenizer_holds_back_a_possible_stop_string(tiny_model_dir):
    _, tokenizer = load_base_model(tiny_model_dir)
    detok = Detokenizer(tokenizer, stops=["END"])
    pieces = [detok.push(t) for t in tokenizer("ab EN", add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == "ab " and not detok.stopped  # "EN" might start "END": held back
    assert detok.push(tokenizer("X", add_special_tokens=False)["input_ids"][0]) == "ENX"
    pieces = []
    for t in tokenizer("yEN", add_special_tokens=False)["input_ids"]:
        pieces.append(detok.push(t))
    assert pieces == ["y", "", ""] and not detok.stopped
    assert detok.push(tokenizer("D", add_special_tokens=False)["input_ids"][0]) == ""  # the stop is cut
    assert detok.stopped and detok.text == "ab ENXy" and detok.rest() == ""


def test_serve_is_a_cli_command():
    from cli.main import build_parser

    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9001"])
    assert (args.host, args.port, args.func.__name__) == ("0.0.0.0", 9001, "cmd_serve")
