"""Fixtures of the monitoring tests: worker hosts serving /metrics, promtool."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from tests.conftest import REDIS_URL, WorkerProcess, require_service


@pytest.fixture
def broker_url() -> str:
    """Redis only: what is measured does not depend on the broker (tests/integration runs the
    worker on both), and each of these tests runs a whole worker host."""
    require_service("Redis", REDIS_URL, 6379)
    return REDIS_URL


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (Debian: apt-get install prometheus)", pytrace=False)
    return path


def promtool_check_metrics(promtool: str, text: str) -> None:
    """`promtool check metrics`: the exposition parses and follows Prometheus's naming rules."""
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout}{result.stderr}"


class HostProcess(WorkerProcess):
    """A `pixelmill ARGS...` process (worker host, exporter, ...) with its log; a WorkerProcess
    so that `wait_for` shows its log when it exits or a wait times out."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from cli.main import main; main()", *args],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def start_pixelmill(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str]], HostProcess]]:
    """Start `pixelmill ARGS...` processes; all are stopped after the test."""
    started: list[HostProcess] = []

    def start(args: list[str], env: dict[str, str]) -> HostProcess:
        name = f"{args[0]}-{uuid.uuid4().hex[:6]}.log"
        process = HostProcess(args, env, tmp_path / name)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def engine(fresh_database_url: str) -> Iterator[Engine]:
    """An engine on the test's fresh database, disposed even when the test fails."""
    made = create_engine(fresh_database_url)
    yield made
    made.dispose()
