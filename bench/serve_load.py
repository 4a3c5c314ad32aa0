"""`moral serve` under load: concurrent clients for a while, a promotion and a rollback midway.

A real ``moral serve`` process over a data home with three adapter versions: v1 promoted, v2 a
candidate the driver promotes a third of the way in and rolls back at two thirds, v3 a candidate
whose files were changed after registration (it must never answer). Each client loops over four
kinds of request: a plain completion, a streamed one read to ``[DONE]``, a stream dropped after its
first text chunk (the client goes away), and, one in seven, a request pinned to v3 (a 400 expected).

Checked: no 5xx and no in-band error; every answer names a version whose files verified (v1 or
v2, never the base model standing in for a champion that failed to load, never v3); requests that
start after the promotion (rollback) has had a poll interval to be seen are answered by v2 (v1);
after the run a request still completes (no dropped stream kept the model). Latency p50/p95 per
kind, the time to the first streamed text, and requests per second are printed.

    PYTHONPATH=. .venv/bin/python bench/serve_load.py [--clients 8] [--seconds 60] [--tiny]

``--tiny`` serves the tiny test model (fast, what CI's bounded test uses); the default serves the
bundled SmolLM2-135M-Instruct with random-initialised adapters (the timing of a real answer).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "What is the maximum payload of the Quillfeather Q7 drone?"
MODEL_ID = "moral-refresh"
VERSION_HEADER = "x-moral-adapter-version"  # server.app.VERSION_HEADER
KINDS = ("plain", "stream", "dropped", "plain", "stream", "dropped", "pinned-unverified")


def save_random_version(
    settings: Any,
    registry: Any,
    seed: int,
    scale: float = 1.0,
    promote: bool = True,
    base_sha256: str | None = None,
    name: str = "load",
) -> int:
    """A MoRAL adapter with seeded random experts (``scale`` times a standard normal; a fresh
    LoRA B is zero, i.e. the base model), written to the adapter store and registered; promoted by
    the gate unless ``promote`` is false; ``base_sha256`` records another base model's checksum
    (a version that must never load here). Returns its version number."""
    import torch

    from moe.base_model import base_model_identity, load_base_model
    from moe.config import MoRALConfig
    from moe.model import MoRALModel
    from storage.artifacts import AdapterStore

    path, identity = base_model_identity(settings.base_model, settings.model_cache)
    base, _ = load_base_model(path)
    sha = base_sha256 or identity["sha256"]
    config = MoRALConfig(num_experts=2, top_k=1, rank=2, base_model_sha256=sha)
    model = MoRALModel(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    info = AdapterStore(settings.adapters_dir).write(f"{name}-{seed}", model.save_pretrained)
    version = registry.create_version(
        base_model=str(settings.base_model or identity["name"]),
        base_model_sha256=sha,
        artifact_uri=info.uri,
        artifact_sha256=info.sha256,
        kind="moral",
    )
    if promote:
        registry.decide_version(version, "promoted", [f"{name}: promoted"], actor=name)
    return version


@dataclass
class Request:
    kind: str
    client: int
    started: float  # seconds since the load began
    seconds: float = 0.0
    status: int = 0
    version: str | None = None  # the x-moral-version header
    model: str | None = None  # the body's (or chunks') model field
    first_text_s: float | None = None  # streams: time to the first text chunk
    error: str | None = None  # a transport failure, an in-band error, a malformed stream


@dataclass
class LoadReport:
    clients: int
    seconds: float
    requests: list[Request] = field(default_factory=list)
    promoted_at: float | None = None  # when the promotion had committed
    rollback_from: float | None = None  # when the rollback began
    rolled_back_at: float | None = None  # when it had committed
    after_ok: bool = False
    problems: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(env: dict[str, str], port: int, log: Path, timeout_s: float = 300.0) -> subprocess.Popen:
    """``moral serve`` as its own process (and process group); returns once /health answers."""
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moral serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"moral serve did not answer /health within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, home: Path | None = None) -> None:
    """Stop ``moral serve``, and with ``home`` the data home's Chroma server it started (a per-home
    daemon that outlives it by design: ``moral chroma stop``)."""
    if home is not None:
        try:
            _stop(proc)
        finally:
            from storage.chroma_server import stop_chroma_server
            from storage.settings import Settings

            stop_chroma_server(Settings(home=home))
        return
    _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _one(http: Any, url: str, kind: str, max_tokens: int, t0: float, client: int) -> Request:
    import httpx

    start = time.monotonic()
    req = Request(kind, client, round(start - t0, 3))
    body: dict[str, Any] = {
        "model": f"{MODEL_ID}@v3" if kind == "pinned-unverified" else MODEL_ID,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
    }
    try:
        if kind in ("plain", "pinned-unverified"):
            r = http.post(f"{url}/v1/chat/completions", json=body)
            req.status, req.version = r.status_code, r.headers.get(VERSION_HEADER)
            if r.status_code == 200:
                req.model = r.json()["model"]
        else:
            body["stream"] = True
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                req.status, req.version = r.status_code, r.headers.get(VERSION_HEADER)
                done = False
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        req.error = f"in-band error: {event['error']}"
                        break
                    req.model = event.get("model", req.model)
                    text = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
                    if text and req.first_text_s is None:
                        req.first_text_s = time.monotonic() - start
                        if kind == "dropped":
                            break  # leaving the block closes the connection mid-stream
                if kind == "stream" and not done and req.error is None and r.status_code == 200:
                    req.error = "stream ended without [DONE]"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        req.error = f"{type(exc).__name__}: {exc}"
    req.seconds = time.monotonic() - start
    return req


def run_load(
    url: str,
    registry_path: Path,
    promote: int,
    clients: int = 8,
    seconds: float = 60.0,
    max_tokens: int = 24,
    poll_s: float = 1.0,
) -> LoadReport:
    """Drive the server at ``url`` and check the answers (see the module doc)."""
    import httpx

    from storage.registry import Registry

    report = LoadReport(clients, seconds)
    t0 = time.monotonic()
    stop_at = t0 + seconds
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        n = 0
        with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as http:
            while time.monotonic() < stop_at:
                one = _one(http, url, KINDS[(i + n) % len(KINDS)], max_tokens, t0, i)
                n += 1
                with lock:
                    report.requests.append(one)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    reg = Registry(registry_path)
    time.sleep(seconds / 3)
    reg.decide_version(promote, "promoted", ["load test: promoted midway"], actor="bench")
    report.promoted_at = time.monotonic() - t0
    time.sleep(max(0.0, t0 + 2 * seconds / 3 - time.monotonic()))
    report.rollback_from = time.monotonic() - t0
    reg.rollback(actor="bench", reason="load test: rolled back midway")
    report.rolled_back_at = time.monotonic() - t0
    for t in threads:
        t.join()
    with httpx.Client(timeout=60) as http:
        after = _one(http, url, "plain", max_tokens, t0, -1)
    report.after_ok = after.status == 200 and after.version == "v1"
    report.problems = check(report, poll_s)
    return report


def check(report: LoadReport, poll_s: float) -> list[str]:
    """What went wrong, one line each (empty: the contract held)."""
    problems = []
    settle = poll_s + 0.5  # a request resolved just before a change may still be answered by the old one
    assert report.promoted_at is not None and report.rollback_from is not None
    assert report.rolled_back_at is not None
    for r in report.requests:
        where = f"{r.kind} request of client {r.client} at {r.started:.1f} s"
        if r.error:
            problems.append(f"{where}: {r.error}")
        if r.status >= 500 or r.status == 0:
            problems.append(f"{where}: HTTP {r.status}")
        if r.kind == "pinned-unverified":
            if r.status != 400:
                problems.append(f"{where}: the unverified v3 got HTTP {r.status}, not 400")
            continue
        if r.status != 200:
            problems.append(f"{where}: HTTP {r.status}")
            continue
        if r.version not in ("v1", "v2") or r.model != f"{MODEL_ID}@{r.version}":
            problems.append(f"{where}: answered by {r.version} / {r.model}")
        # Between the promotion (seen) and the rollback (begun): a request that was still running
        # when the rollback began may have looked the champion up after it.
        in_v2_window = (
            report.promoted_at + settle < r.started and r.started + r.seconds < report.rollback_from
        )
        if in_v2_window and r.version != "v2":
            problems.append(f"{where}: {r.version} answered after v2 was promoted")
        if r.started > report.rolled_back_at + settle and r.version != "v1":
            problems.append(f"{where}: {r.version} answered after the rollback to v1")
    if not any(r.version == "v2" for r in report.requests):
        problems.append("v2 never answered")
    if not report.after_ok:
        problems.append("after the load, a plain request did not complete with v1")
    return problems


def _quantiles(values: list[float]) -> dict[str, float | int | None]:
    import numpy as np

    if not values:
        return {"n": 0, "p50": None, "p95": None}
    a = np.asarray(values)
    return {
        "n": len(values),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
    }


def summary(report: LoadReport) -> dict:
    reqs = report.requests
    out: dict[str, Any] = {
        "clients": report.clients,
        "seconds": report.seconds,
        "requests": len(reqs),
        "requests_per_s": round(len(reqs) / report.seconds, 2),
        "statuses": {str(s): sum(r.status == s for r in reqs) for s in sorted({r.status for r in reqs})},
        "answered_by": {
            str(v): sum(r.version == v for r in reqs if r.kind != "pinned-unverified")
            for v in sorted({str(r.version) for r in reqs if r.kind != "pinned-unverified"})
        },
        "promoted_at_s": round(report.promoted_at or 0, 2),
        "rolled_back_at_s": round(report.rolled_back_at or 0, 2),
        "latency_s": {
            k: _quantiles([r.seconds for r in reqs if r.kind == k and r.status == 200])
            for k in ("plain", "stream")
        },
        "first_text_s": _quantiles([r.first_text_s for r in reqs if r.first_text_s is not None]),
        "dropped_streams": sum(r.kind == "dropped" and r.first_text_s is not None for r in reqs),
        "problems": report.problems[:50],
        "problem_count": len(report.problems),
    }
    return out


def make_home(home: Path, base_model: str | None) -> tuple[dict[str, str], Path]:
    """A data home with v1 promoted, v2 a candidate and v3 a candidate whose files changed after
    registration; returns (the server's environment, the registry path)."""
    from storage.registry import Registry
    from storage.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAL_") or k == "MORAL_MODEL_CACHE"}
    env.update({"MORAL_HOME": str(home), "MORAL_SERVE_POLL_S": "1.0", "PYTHONPATH": str(ROOT)})
    if base_model:
        env["MORAL_BASE_MODEL"] = base_model
    settings = Settings(home=home, base_model=base_model)
    settings.ensure_dirs()
    reg = Registry.from_settings(settings)
    scale = 1.0 if base_model else 0.02  # the real model answers sensibly with small random experts
    v1 = save_random_version(settings, reg, seed=1, scale=scale)
    v2 = save_random_version(settings, reg, seed=2, scale=scale, promote=False)
    v3 = save_random_version(settings, reg, seed=3, scale=scale, promote=False)
    assert (v1, v2, v3) == (1, 2, 3)
    weights = next(Path(reg.get_version(v3).artifact_uri).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # bit rot after registration
    return env, settings.registry_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--tiny", action="store_true", help="serve the tiny test model")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="moral-serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    base_model = None
    if args.tiny:
        from tests.moe.tiny import save_tiny_base

        (work / "tiny-base").mkdir(exist_ok=True)
        save_tiny_base(work / "tiny-base")
        base_model = str(work / "tiny-base")
    env, registry_path = make_home(work / "home", base_model)
    port = _free_port()
    started = time.perf_counter()
    proc = start_server(env, port, work / "serve.log")
    startup_s = time.perf_counter() - started
    try:
        report = run_load(
            f"http://127.0.0.1:{port}", registry_path, 2, args.clients, args.seconds, args.max_tokens
        )
    finally:
        stop_server(proc, work / "home")
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct",
        "max_tokens": args.max_tokens,
        "server_startup_s": round(startup_s, 1),
        **summary(report),
    }
    print(json.dumps(out, indent=2))
    return 0 if not report.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
