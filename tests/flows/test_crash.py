"""kill -9 during a refresh, then a rerun (issue: nothing lost to a crash). A bounded set of kill
points here; every point, with timings, in ``bench/crash.py``."""

from __future__ import annotations

import pytest

from tests.crash import check_home, kill_and_rerun, refresh_env, run_refresh

pytestmark = pytest.mark.integration

#: Mid-QA (replies cached, more to come; where replies were once paid twice) and the adapter written
#: but not registered. The other eight points, mid-index included, run in bench/crash.py.
POINTS = ("qa.cached:2", "train.artifact")


def test_a_refresh_killed_anywhere_resumes_without_duplicates_or_paying_twice(
    settings, tmp_path, tiny_model_dir, llm_endpoint, source_dir
):
    reference_home = tmp_path / "clean"
    clean = run_refresh(source_dir, refresh_env(reference_home, tiny_model_dir, llm_endpoint.base_url))
    assert clean.returncode == 0, clean.stderr[-2000:]
    reference_calls = llm_endpoint.calls
    reference = check_home(reference_home)
    assert reference.problems == [] and reference.counts["versions"] == 1 and reference.counts["pairs"] > 0
    results = [
        kill_and_rerun(p, tmp_path, source_dir, tiny_model_dir, llm_endpoint, reference, reference_calls)
        for p in POINTS
    ]
    assert all(r.killed for r in results), [(r.point, r.problems) for r in results]
    assert [(r.point, r.problems) for r in results] == [(p, []) for p in POINTS]


def test_a_deployment_run_beside_a_cli_refresh_fails_at_once_naming_it_and_writes_nothing(
    settings, tmp_path, tiny_model_dir, llm_endpoint, source_dir, prefect_harness, monkeypatch
):
    """Two refreshes of one data home at once: a `moral refresh` process (held in QA by a slow
    endpoint) and a run started from a deployment. The second refuses within seconds, names the
    first (its pid and flow run), and leaves no trace; the first completes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from flows.params import RefreshParams
    from flows.refresh import knowledge_refresh
    from storage.lock import FileLock, LockBusyError
    from storage.registry import Registry
    from storage.settings import get_settings
    from tests.crash import ROOT

    home = settings.home
    llm_endpoint.state.latency = 0.4  # keeps the CLI run in its QA stage for several seconds
    env = refresh_env(home, tiny_model_dir, llm_endpoint.base_url)
    with tempfile.TemporaryFile("w+") as out:
        cli = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "refresh", "--source", str(source_dir), "--json"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            lock = FileLock(home / "refresh.lock", purpose="probe")
            deadline = time.monotonic() + 120
            while (holder := lock.holder()) is None or llm_endpoint.calls == 0:
                assert time.monotonic() < deadline and cli.poll() is None, "the CLI refresh never started QA"
                time.sleep(0.2)
            assert holder.pid == cli.pid
            runs_before = len(Registry.from_settings(settings).runs())
            monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "manual-run-from-the-ui")
            monkeypatch.setenv("MORAL_REFRESH_SOURCE", str(source_dir))
            get_settings.cache_clear()
            started = time.monotonic()
            with pytest.raises(LockBusyError) as refused:
                knowledge_refresh(RefreshParams(source=str(source_dir), home=str(home)))
            assert time.monotonic() - started < 30  # at once, not after the other run
            assert f"by pid {cli.pid}" in str(refused.value) and "flow run" in str(refused.value)
            assert len(Registry.from_settings(settings).runs()) == runs_before  # nothing written
            assert cli.wait(timeout=600) == 0
        finally:
            try:
                os.killpg(cli.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        assert json.loads(out.read())["status"] == "completed"
