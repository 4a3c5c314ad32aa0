"""Local runs on a busy machine: Prefect's temporary API server gets time to start and a second try,
and ``--json`` quiets the console without starving the API of the run's logs."""

from __future__ import annotations

import logging
import os

import pytest

import flows.refresh as refresh
from flows.params import RefreshParams
from storage.settings import OFFLINE_ENV, apply_runtime_env


def test_the_local_server_gets_two_minutes_unless_the_user_says_otherwise(monkeypatch):
    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    assert OFFLINE_ENV[key] == "120"
    monkeypatch.delenv(key, raising=False)
    apply_runtime_env()
    assert os.environ[key] == "120"
    monkeypatch.setenv(key, "300")
    apply_runtime_env()
    assert os.environ[key] == "300"


def _flaky_flow(monkeypatch, failures: int) -> list[int]:
    calls: list[int] = []

    def flow_for(_settings):
        def run(_params):
            calls.append(1)
            if len(calls) <= failures:
                raise RuntimeError(refresh._EPHEMERAL_TIMEOUT + ". Ephemeral server process exited.")
            return {"status": "completed"}

        return run

    monkeypatch.setattr(refresh, "refresh_flow", flow_for)
    return calls


def test_a_server_start_that_times_out_is_tried_once_more(settings, monkeypatch, capsys, tmp_path):
    calls = _flaky_flow(monkeypatch, failures=1)
    summary = refresh.run_refresh(RefreshParams(source=str(tmp_path)))
    assert summary["status"] == "completed" and len(calls) == 2
    assert "trying once more (nothing was run)" in capsys.readouterr().err


def test_two_timeouts_fail_with_what_to_do(settings, monkeypatch, tmp_path):
    calls = _flaky_flow(monkeypatch, failures=2)
    with pytest.raises(RuntimeError, match="did not start in time, twice.*PREFECT_API_URL"):
        refresh.run_refresh(RefreshParams(source=str(tmp_path)))
    assert len(calls) == 2


def test_other_errors_are_not_retried(settings, monkeypatch, tmp_path):
    def flow_for(_settings):
        def run(_params):
            raise RuntimeError("the registry is locked")

        return run

    monkeypatch.setattr(refresh, "refresh_flow", flow_for)
    with pytest.raises(RuntimeError, match="registry is locked"):
        refresh.run_refresh(RefreshParams(source=str(tmp_path)))


def test_quiet_console_keeps_the_loggers_level_for_the_api(monkeypatch):
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    console, api = PrefectConsoleHandler(), APILogHandler()
    logger = logging.getLogger("prefect.flow_runs")
    monkeypatch.setattr(logger, "handlers", [console, api])
    monkeypatch.setattr(logger, "level", logging.INFO)
    refresh.quiet_console()
    assert console.level == logging.WARNING  # the terminal shows warnings only
    assert api.level == logging.NOTSET and logger.getEffectiveLevel() == logging.INFO  # the UI gets INFO
    assert logging.getLogger("prefect").getEffectiveLevel() <= logging.INFO
