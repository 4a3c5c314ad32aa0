"""`moral serve` under load, bounded: a real server process over the tiny model, 8 clients for a
few seconds (plain, streamed, streams dropped mid-way, requests pinned to a version whose files
changed), a promotion and a rollback in the middle (``bench/serve_load.py`` runs it for 60 s on the
bundled model and records latency in BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from bench.serve_load import (
    LoadReport,
    Request,
    check,
    make_home,
    run_load,
    start_server,
    stop_server,
    summary,
)


@pytest.mark.integration  # a real `moral serve` process on loopback
def test_eight_clients_through_a_promotion_and_a_rollback(tmp_path, tiny_model_dir, monkeypatch):
    import socket

    for key in ("MORAL_CHROMA_URL", "MORAL_SERVE_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    env, registry_path = make_home(tmp_path / "home", str(tiny_model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(env, port, tmp_path / "serve.log")
    try:
        report = run_load(f"http://127.0.0.1:{port}", registry_path, 2, clients=8, seconds=9.0, max_tokens=12)
    finally:
        stop_server(proc, tmp_path / "home")
    out = summary(report)
    assert report.problems == [], report.problems[:10]
    assert out["dropped_streams"] > 0 and out["statuses"].get("400", 0) > 0  # v3 was asked for, refused
    assert set(out["answered_by"]) == {"v1", "v2"} and not any(s >= "500" for s in out["statuses"])
    assert report.after_ok


def test_the_check_flags_what_the_contract_forbids():
    """The load check itself: a 5xx, a broken stream, the base model or the unverified version
    answering, and a stale version after a change are each reported."""
    ok = dict(status=200, version="v1", model="moral-refresh@v1")
    report = LoadReport(8, 9.0, promoted_at=3.0, rollback_from=6.0, rolled_back_at=6.1, after_ok=True)
    report.requests = [
        Request("plain", 0, 1.0, **ok),
        Request("stream", 1, 4.0, status=200, version="v2", model="moral-refresh@v2"),
        Request("pinned-unverified", 2, 1.0, status=400),
    ]
    assert check(report, poll_s=1.0) == []
    bad = [
        Request("plain", 3, 1.0, status=503),
        Request("stream", 4, 1.0, error="stream ended without [DONE]", **ok),
        Request("plain", 5, 1.0, status=200, version="base", model="moral-refresh@base"),
        Request("pinned-unverified", 6, 1.0, status=200, version="v3", model="moral-refresh@v3"),
        Request("plain", 7, 5.0, **ok),  # v1 after v2 was promoted (and seen)
        Request("plain", 0, 8.0, status=200, version="v2", model="moral-refresh@v2"),  # after the rollback
    ]
    report.requests += bad
    problems = check(report, poll_s=1.0)
    for client in range(3, 8):
        assert any(f"client {client} " in p for p in problems), client
    assert any("at 8.0 s" in p and "after the rollback" in p for p in problems)
