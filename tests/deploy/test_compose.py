"""deploy/compose.yaml: valid against the Compose Specification's schema, refuses to start
without its secrets, and wires pixelmill's services the way the README describes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pixelmill.settings import Settings
from tests.deploy.compose_env import InterpolationError, interpolate

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"

SECRETS = (
    "POSTGRES_PASSWORD",
    "RABBITMQ_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "PIXELMILL_REVIEW_SECRET_KEY",
    "GRAFANA_ADMIN_PASSWORD",
)
FULL_ENV = {name: f"{name.lower()}-" + "x" * 32 for name in SECRETS}
PIXELMILL_SERVICES = ("migrate", "dispatcher", "worker", "review", "exporter")


def compose(env: dict[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    result: dict[str, Any] = interpolate(document, env)
    return result


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    result: dict[str, Any] = compose(FULL_ENV)["services"]
    return result


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose(FULL_ENV)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_misspelt_option() -> None:
    document = compose(FULL_ENV)
    document["services"]["worker"]["stop_grace_periode"] = "2h"
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    assert any("stop_grace_periode" in e.message for e in validator.iter_errors(document))


@pytest.mark.parametrize("secret", SECRETS)
def test_each_required_secret_fails_fast_when_unset(secret: str) -> None:
    env = {k: v for k, v in FULL_ENV.items() if k != secret}
    with pytest.raises(InterpolationError, match=rf"\b{secret}\b.*deploy/\.env"):
        compose(env)
    with pytest.raises(InterpolationError, match=rf"\b{secret}\b"):
        compose({**env, secret: ""})  # set but empty is not a password either


def test_no_password_is_written_in_the_file() -> None:
    text = COMPOSE.read_text()
    for line in text.splitlines():
        if re.search(r"(PASSWORD|SECRET)[A-Z_]*:\s", line):
            assert "${" in line or "$$" in line, f"literal secret in compose.yaml: {line.strip()}"


def test_every_required_secret_is_in_the_example_env_file() -> None:
    example = (DEPLOY / "compose.env.example").read_text()
    for secret in SECRETS:
        assert re.search(rf"^{secret}=$", example, re.MULTILINE), secret
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()  # the filled-in copy


def test_services_of_the_issue_are_all_there(services: dict[str, Any]) -> None:
    assert set(services) >= {
        "postgres", "rabbitmq", "redis", "minio", "migrate", "dispatcher", "worker", "review",
        "exporter", "prometheus", "grafana",
    }  # fmt: skip


def test_pixelmill_services_get_valid_settings(services: dict[str, Any]) -> None:
    for name in PIXELMILL_SERVICES:
        env = services[name]["environment"]
        values = {k.removeprefix("PIXELMILL_").lower(): v for k, v in env.items()}
        settings = Settings(**values, _env_file=None)  # type: ignore[call-arg]
        assert settings.database_url.startswith("postgresql+psycopg://pixelmill:"), name
        assert settings.storage == "s3", name


def test_migrations_run_once_before_every_pixelmill_process(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("dispatcher", "worker", "review", "exporter"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def _seconds(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", duration))


def test_gpu_worker_reserves_gpus_and_outlives_its_longest_job(services: dict[str, Any]) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["build"]["dockerfile"] == "deploy/docker/worker.Dockerfile"
    hard_limit = Settings(_env_file=None).task_time_limit  # type: ignore[call-arg]
    assert _seconds(worker["stop_grace_period"]) > hard_limit
    assert worker["environment"]["PIXELMILL_METRICS_PORT"] == "9464"
    assert worker["environment"]["PROMETHEUS_MULTIPROC_DIR"]


def test_ports_match_the_prometheus_scrape_config(services: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pixelmill-worker"]["dns_sd_configs"][0]["port"] == int(
        services["worker"]["environment"]["PIXELMILL_METRICS_PORT"]
    )
    assert jobs["pixelmill-dispatcher"]["static_configs"][0]["targets"] == [
        "dispatcher:" + services["dispatcher"]["environment"]["PIXELMILL_DISPATCH_METRICS_PORT"]
    ]
    assert jobs["pixelmill-exporter"]["static_configs"][0]["targets"] == [
        "exporter:" + services["exporter"]["command"][-1]
    ]
    assert jobs["pixelmill-review"]["static_configs"][0]["targets"] == [
        "review:" + services["review"]["command"][-1]
    ]


def test_mounted_files_and_dockerfiles_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            # The project's own files (not the operator's models folder).
            if source.startswith("./") and target != "/models":
                assert (DEPLOY / source).exists(), f"{name}: {source}"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")))
def test_dockerfiles_copy_what_exists_and_run_pixelmill(dockerfile: Path) -> None:
    instructions = [
        line.split(maxsplit=1)
        for line in dockerfile.read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(" ")
    ]
    copies = [args.split()[:-1] for op, args in instructions if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}"
    assert ["FROM", "python:3.11-slim"] in instructions
    assert ["ENTRYPOINT", '["pixelmill"]'] in instructions
    assert any(op == "USER" for op, _ in instructions), "runs as root"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
    for sources in copies:
        for source in sources:
            assert f"!{source}" in ignore or f"!{source}/" in ignore, source
