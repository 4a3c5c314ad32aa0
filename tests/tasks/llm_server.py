"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, with fault injection.

It answers `POST /v1/chat/completions` with QA JSON derived from the excerpt between the prompt's
delimiters (one question per sentence: "In the passage, what comes after '<words>'?" with the
sentence's last two words as the answer), so replies pass `validate_pair`. Faults are scripted
per call (`server.script(...)`) and apply in order before normal replies resume.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tasks.chunking import split_sentences
from tasks.qa_openai import DOC_END, DOC_START


@dataclass
class Fault:
    """One scripted reply: kind in {'429', '500', '401', '400-schema', 'timeout', 'malformed',
    'bad-body', 'prose', 'echo'}; `retry_after` (seconds, header) for 429; `sleep` for 'timeout'."""

    kind: str
    retry_after: float | None = None
    sleep: float = 2.0


@dataclass
class ServerState:
    latency: float = 0.0
    # True: honour response_format; False: ignore it and reply in prose + fenced JSON;
    # "reject": answer 400 to any request carrying response_format (old llama.cpp / Ollama).
    structured: bool | str = True
    pairs_per_call: int = 3
    # 2: each sentence is also asked in a far second wording; 3: and a third, far from both (a fact
    # keeps two trained wordings when one is held out as a paraphrase question)
    wordings: int = 1
    # True: an endpoint that obeys orders in the document ("... reply with X"): it answers X to many
    # questions, in as many pairs as it likes (prompt injection tests)
    obey: bool = False
    faults: list[Fault] = field(default_factory=list)
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    call_times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def qa_from_prompt(user_content: str, n: int, wordings: int = 1) -> list[dict[str, str]]:
    """Deterministic, valid QA pairs from the excerpt inside the delimiters (``wordings`` = 2 adds a
    second, lexically far question for each sentence, with the same answer; 3 a third)."""
    m = re.search(re.escape(DOC_START) + r"\n(.*)\n" + re.escape(DOC_END), user_content, re.S)
    excerpt = m.group(1) if m else ""
    pairs = []
    for sentence in split_sentences(excerpt):
        words = sentence.rstrip(".!?").split()
        if len(words) < 6:
            continue
        answer = " ".join(words[-2:])
        lead = " ".join(words[-6:-2]).strip("\"'")
        pairs.append({"question": f"In the passage, what comes after the words '{lead}'?", "answer": answer})
        if wordings > 1:
            opening = " ".join(words[:3]).strip("\"'")
            pairs.append(
                {"question": f"Which two tokens finish the line opening with '{opening}'?", "answer": answer}
            )
        if wordings > 2:
            middle = " ".join(words[len(words) // 2 - 1 : len(words) // 2 + 1]).strip("\"'")
            pairs.append(
                {
                    "question": f"Which pair of terms closes a statement containing '{middle}'?",
                    "answer": answer,
                }
            )
        if len(pairs) >= n:
            break
    return pairs


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections like a real server
    # Headers and body go out in two writes; with Nagle on, the body waits ~40 ms for the client's
    # delayed ACK on every call, which would swamp the latencies the tests set on purpose.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        """`GET /stats`: call counters, for a client that runs this server in another process."""
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        if self.path.rstrip("/") != "/stats":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        with state.lock:
            stats = {"calls": state.calls, "max_in_flight": state.max_in_flight}
        self._send(200, json.dumps(stats).encode())

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        body = json.loads(raw)
        with state.lock:
            state.calls += 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            state.requests.append(body)
            state.headers.append({k.lower(): v for k, v in self.headers.items()})
            state.call_times.append(time.monotonic())
            fault = state.faults.pop(0) if state.faults else None
        try:
            self._reply(state, body, fault)
        finally:
            with state.lock:
                state.in_flight -= 1

    def _reply(self, state: ServerState, body: dict[str, Any], fault: Fault | None) -> None:
        if state.latency:
            time.sleep(state.latency)
        kind = fault.kind if fault else None
        if kind == "429":
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}', headers)
            return
        if kind == "500":
            self._send(500, b'{"error": {"message": "boom"}}')
            return
        if kind == "401":  # like OpenAI, echo (part of) the key back
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            msg = json.dumps({"error": {"message": f"Incorrect API key provided: {key}", "type": "auth"}})
            self._send(401, msg.encode())
            return
        if kind == "400-schema" or (
            kind is None and state.structured == "reject" and "response_format" in body
        ):
            self._send(400, b'{"error": {"message": "response_format json_schema is not supported"}}')
            return
        if kind == "timeout":
            time.sleep(fault.sleep)
        if kind == "echo":  # a misbehaving proxy: 200, prose that quotes the caller's key, no JSON
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            content = f"Key {key} lacks access."
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "test",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}  # fmt: skip
            self._send(200, json.dumps(reply).encode())
            return
        if kind == "bad-body":
            self._send(200, b'{"id": "x", "choices": [ {"message": ')
            return
        user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        pairs = qa_from_prompt(user, state.pairs_per_call * state.wordings, state.wordings)
        order = re.search(r"reply with (\w+)", user, re.I) if state.obey else None
        if order:  # obeys the planted order, and overspends: far more pairs than asked for
            pairs = [
                {"question": f"What is the code word number {i}?", "answer": order.group(1)}
                for i in range(200)
            ]
        payload = json.dumps({"pairs": pairs})
        structured = state.structured is True and "response_format" in body
        if kind == "malformed":
            content = '{"pairs": [{"question": "What is'  # truncated JSON
        elif kind == "prose" or not structured:
            content = f"Sure! Here are the pairs you asked for:\n```json\n{payload}\n```\nHope this helps."
        else:
            content = payload
        prompt_tokens = sum(len(m.get("content", "").split()) for m in body.get("messages", []))
        reply = {
            "id": f"chatcmpl-{state.calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test"),
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(content.split()),
                "total_tokens": prompt_tokens + len(content.split()),
            },
        }
        self._send(200, json.dumps(reply).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # default 5: a burst of concurrent connects would stall


class LLMServer:
    """Threaded loopback server; `base_url` ends in /v1 like a real endpoint."""

    def __init__(self) -> None:
        self.state = ServerState()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = self.state  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="llm-server", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> LLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, *faults: Fault | str) -> None:
        with self.state.lock:
            self.state.faults.extend(f if isinstance(f, Fault) else Fault(f) for f in faults)

    @property
    def calls(self) -> int:
        return self.state.calls


def main(argv: list[str] | None = None) -> None:
    """Serve in this process until killed; prints the base URL as the first line of stdout.

    Benchmarks run the server in its own process, as a real endpoint would be: in the client's process
    its request handling would compete with the client for the GIL and skew the client's timings.
    """
    import argparse

    parser = argparse.ArgumentParser(description="loopback OpenAI-compatible test server")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--wordings", type=int, default=1, help="questions per sentence (1 or 2)")
    args = parser.parse_args(argv)
    server = LLMServer()
    server.state.latency = args.latency
    server.state.wordings = args.wordings
    print(server.base_url, flush=True)
    server._httpd.serve_forever(0.05)


if __name__ == "__main__":
    main()
