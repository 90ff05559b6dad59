"""The Prometheus files in deploy/: promtool accepts the configuration and the alert rules, and
the rules' own unit tests (pixelmill.rules.test.yml) pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (Debian: apt-get install prometheus)", pytrace=False)
    return path


def run(promtool: str, *args: str) -> str:
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, check=False, cwd=PROMETHEUS
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def test_promtool_check_rules(promtool: str) -> None:
    rules = sorted(str(p) for p in (PROMETHEUS / "rules").glob("*.rules.yml"))
    assert rules
    output = run(promtool, "check", "rules", *rules)
    assert "SUCCESS: 6 rules found" in output


def test_promtool_test_rules(promtool: str) -> None:
    run(promtool, "test", "rules", str(PROMETHEUS / "rules" / "pixelmill.rules.test.yml"))


def test_promtool_check_config(promtool: str) -> None:
    run(promtool, "check", "config", "--syntax-only", str(PROMETHEUS / "prometheus.yml"))


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: a rule with a syntax error is refused."""
    broken = tmp_path / "broken.rules.yml"
    text = (PROMETHEUS / "rules" / "pixelmill.rules.yml").read_text()
    broken.write_text(text.replace("up{job=", "up{{job=", 1))
    result = subprocess.run(
        [promtool, "check", "rules", str(broken)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
