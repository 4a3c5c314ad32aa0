"""`moral deploy`'s deployments, applied to a real local Prefect server (the test harness) and read
back through the Prefect client: names, the nightly cron and timezone, concurrency limits, the Run
form's parameter schema, and the data home they carry.  ``serve`` itself is not started (it blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.settings import Settings


def _schema_props(schema: dict, model: str) -> dict:
    return schema["definitions"][model]["properties"]


def test_deployments_registered_with_schedule_limits_and_parameter_schema(
    prefect_harness, settings: Settings, tmp_path: Path
) -> None:
    from prefect import get_client

    from flows.deploy import build_deployments

    docs = tmp_path / "docs"
    docs.mkdir()
    cfg = settings.model_copy(
        update={"refresh_hour": 3, "refresh_timezone": "Europe/Berlin", "refresh_source": docs}
    )
    deployments = build_deployments(cfg)
    for deployment in deployments:
        deployment.apply()

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("knowledge-refresh/nightly")
        manual = client.read_deployment_by_name("knowledge-refresh/manual")
        rollback = client.read_deployment_by_name("rollback-adapter/manual")

    # The nightly schedule: cron at the configured hour, in the configured timezone, active.
    assert len(nightly.schedules) == 1 and nightly.schedules[0].active
    assert nightly.schedules[0].schedule.cron == "0 3 * * *"
    assert nightly.schedules[0].schedule.timezone == "Europe/Berlin"
    assert manual.schedules == [] and rollback.schedules == []

    for d in (nightly, manual, rollback):
        limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else d.concurrency_limit
        assert limit == 1, d.name
        # The data home, absolute, travels with every run as a parameter default.
        assert d.parameters["params"]["home"] == str(settings.home)
        assert Path(d.parameters["params"]["home"]).is_absolute()

    # The refresh defaults carry the source folder resolved at deploy time.
    assert nightly.parameters == manual.parameters
    assert nightly.parameters["params"]["source"] == str(docs.resolve())

    # The Run form: every RefreshParams field, each with a description.
    props = _schema_props(nightly.parameter_openapi_schema, "RefreshParams")
    assert {"source", "until", "epochs", "qa_backend", "gate_min_gain"} <= set(props)
    # Choices are plain enums in the Run form (a dropdown), not anyOf[enum, null] (free text).
    assert props["until"]["enum"] == ["all", "ingest", "qa", "index", "train", "evaluate"]
    assert (
        props["qa_backend"]["enum"] == ["default", "local", "openai"] and "anyOf" not in props["qa_backend"]
    )
    assert all(p.get("description") for p in props.values()), [
        k for k, p in props.items() if not p.get("description")
    ]
    rb = _schema_props(rollback.parameter_openapi_schema, "RollbackParams")
    assert set(rb) == {"to", "reason", "actor", "home"} and all(p.get("description") for p in rb.values())


def test_bad_schedule_settings_fail_before_anything_is_registered(settings: Settings, monkeypatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("MORAL_REFRESH_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValidationError, match="unknown timezone"):
        Settings()
    monkeypatch.setenv("MORAL_REFRESH_TIMEZONE", "UTC")
    monkeypatch.setenv("MORAL_REFRESH_HOUR", "24")
    with pytest.raises(ValidationError, match="refresh_hour"):
        Settings()


def test_prefect_yaml_deployments_point_at_the_flows_and_validate() -> None:
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from flows.params import RefreshParams, RollbackParams

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "prefect.yaml").read_text())
    seen = set()
    for d in config["deployments"]:
        flow = load_flow_from_entrypoint(str(root / d["entrypoint"]))
        seen.add(f"{flow.name}/{d['name']}")
        assert d["concurrency_limit"] == 1 and d["work_pool"]["name"]
        model = RefreshParams if flow.name == "knowledge-refresh" else RollbackParams
        params = model.model_validate(d["parameters"]["params"])
        assert params.home and Path(params.home).is_absolute()
    assert seen == {"knowledge-refresh/nightly", "knowledge-refresh/manual", "rollback-adapter/manual"}
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
