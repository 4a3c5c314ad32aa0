"""One path for a setting: the run's parameter model is derived from `Settings` (types, bounds,
descriptions defined once), and a run's overrides land in the settings it runs with."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.params import RUN_OVERRIDABLE, RefreshParams
from flows.refresh import settings_for
from storage.settings import Settings


def test_fields_copy_the_settings_descriptions_and_bounds():
    props = RefreshParams.model_json_schema()["properties"]
    for name in RUN_OVERRIDABLE:
        assert Settings.model_fields[name].description in props[name]["description"], name
    assert props["epochs"]["anyOf"][0]["minimum"] == 1  # Settings: ge=1
    with pytest.raises(ValidationError):
        RefreshParams(epochs=0)
    with pytest.raises(ValidationError):
        RefreshParams(qa_backend="gpt")


def test_unset_fields_change_nothing_and_set_ones_override(tmp_path):
    base = Settings(home=tmp_path / "home")
    assert RefreshParams().overrides() == {} and settings_for(RefreshParams(), base) is base
    run = settings_for(RefreshParams(epochs=3, qa_backend="openai", source=str(tmp_path)), base)
    assert (run.epochs, run.qa_backend, run.refresh_source) == (3, "openai", tmp_path)
    assert settings_for(RefreshParams(qa_backend="default"), base).qa_backend == base.qa_backend


def test_until_all_runs_everything():
    assert RefreshParams().stop_after is None and RefreshParams(until="index").stop_after == "index"


def test_a_cli_run_resolves_its_settings_once(settings, monkeypatch):
    """run_refresh resolves the run's settings and the flow reuses them instead of building them again."""
    import flows.refresh as refresh

    calls = []
    real = refresh.Settings

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(refresh, "Settings", counting)
    params = RefreshParams(epochs=3)
    first = refresh.settings_for(params, settings)
    token = refresh._RESOLVED.set((params.model_dump_json(), first))
    try:
        assert refresh.settings_for(params) is first and len(calls) == 1  # the flow's call reuses it
        assert refresh.settings_for(RefreshParams(epochs=4)) is not first  # other params: resolved anew
    finally:
        refresh._RESOLVED.reset(token)


def test_settings_shipped_to_dask_workers_carry_no_key(monkeypatch):
    """Dask pickles what a task is sent, possibly to another machine: the API keys stay behind and a
    worker reads them from its own environment. Threads (same process) get the settings as they are."""
    import pickle

    from flows.refresh import shipped
    from storage.settings import SECRET_FIELDS, Settings

    key, serve_key = "sk-live-SECRET-4242", "serve-SECRET-77"
    dask = Settings(task_runner="dask", qa_api_key=key, serve_api_key=serve_key, qa_backend="openai")
    blob = pickle.dumps(shipped(dask))
    assert key.encode() not in blob and serve_key.encode() not in blob
    worker = pickle.loads(blob)
    assert all(getattr(worker, name) is None for name in SECRET_FIELDS)
    assert worker.qa_backend == "openai" and worker.task_runner == "dask"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MORAL_QA_API_KEY", key)  # the worker's environment
    assert worker.resolved_qa_api_key() == key
    threads = Settings(task_runner="threads", qa_api_key=key)
    assert shipped(threads) is threads
