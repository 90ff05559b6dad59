"""Never a traceback: every command, given bad paths, bad options or bad settings, answers with
one line naming what and where, and an exit status (2 for bad input).

Each command is driven with a corpus of such inputs, in process on a SQLite database of the
test's own; a few go through the real entry point (a child process) too. Any ``Traceback`` in
the output, or an exception other than the command's exit, fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

TEMPLATES = """key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 1}
templates:
  studio:
    prompt: "photo of a {{ title }}"
"""
# A wildcard that is a link to a file outside the template's folder.
OUTSIDE_WILDCARD = TEMPLATES.replace("photo of a", "__colours__ photo of a")

C, T = "cat.csv", "templates.yaml"

# (arguments, exit status): the bad input of each command.
CORPUS: list[tuple[list[str], int]] = [
    # produce: paths
    (["produce", "folder", "-t", T], 2),
    (["produce", "missing.csv", "-t", T], 2),
    (["produce", "loop.csv", "-t", T], 2),
    (["produce", "workbook.csv", "-t", T], 2),
    (["produce", "photo.csv", "-t", T], 2),
    (["produce", C, "-t", "folder"], 2),
    (["produce", C, "-t", "missing.yaml"], 2),
    (["produce", C, "-t", "loop.csv"], 2),
    (["produce", C, "-t", "outside/templates.yaml"], 2),
    (["produce", C, "-t", "escape/templates.yaml"], 2),
    (["produce", "header.csv", "-t", T], 2),
    # produce: options
    (["produce", C, "-t", T, "--seeds", "0"], 2),
    (["produce", C, "-t", T, "--seeds", "1000000"], 2),
    (["produce", C, "-t", T, "--seeds", "many"], 2),
    (["produce", C, "-t", T, "--max-jobs", "0"], 2),
    (["produce", C, "-t", T, "--priority", "99999999999"], 2),
    (["produce", C, "-t", T, "--budget", "0"], 2),
    (["produce", C, "-t", T, "--budget", "10", "--seeds", "2"], 2),
    (["produce", C, "-t", T, "--keepers-per-item", "5000"], 2),
    (["produce", C, "-t", T, "--encoding", "klingon"], 2),
    (["produce", C, "-t", T, "--delimiter", "::"], 2),
    (["produce", C, "-t", T, "--sheet", "Products"], 2),
    (["produce", C, "-t", T, "--format", "pdf"], 2),
    (["produce", C, "-t", T, "--table", "items"], 2),
    (["produce", "sqlite:///nowhere/x.db", "-t", T], 2),
    (["produce", "nosuchdb://u:p@h/db", "--table", "t", "-t", T], 2),
    (["produce", C, "-t", T, "--run", "r" * 300], 2),
    (["produce", C], 2),
    # the other commands
    (["status", "nope"], 1),
    (["status", "--interval", "0"], 2),
    (["runs", "--limit", "0"], 2),
    (["run", "pause", "nope"], 1),
    (["run", "priority", "r1", "high"], 2),
    (["run", "priority", "r1", "99999999999"], 2),
    (["run", "explode", "r1"], 2),
    (["export", "nope"], 2),
    (["export", "r1", "--format", "xml"], 2),
    (["export", "r1", "--out", "folder"], 2),
    (["export", "r1", "--out", "missing/dir/kept.csv"], 2),
    (["export", "r1", "--out", f"{C}/kept.csv"], 2),
    (["dispatch", "--watch", "0"], 2),
    (["dispatch", "--watch", "-5"], 2),
    (["worker", "--gpus", "zero"], 2),
    (["worker", "--concurrency", "0"], 2),
    (["demo", "--examples", "missing"], 2),
    (["demo", "--examples", "folder"], 2),
    (["demo", "--timeout", "0"], 2),
    (["review", "--port", "0"], 2),
    (["review", "--port", "70000"], 2),
    (["exporter", "--port", "-1"], 2),
    (["db", "upgrade", "--revision", "nope"], 2),
    (["db", "downgrade"], 2),
    (["model", "tiny", "--out", "m", "--arch", "sd9"], 2),
    (["model", "synthetic", "--arch", "sd9", "--out", "m"], 2),
    (["model", "synthetic", "--arch", "sd15", "--out", "m", "--dtype", "fp7"], 2),
    (["reviewer", "add", "bob", "--password-stdin"], 2),
    (["reviewer", "password", "nobody", "--password-stdin"], 2),
    (["nope"], 2),
]

# (variable, value, arguments, exit status): bad settings, for the commands that use them.
BAD_SETTINGS: list[tuple[str, str, list[str], int]] = [
    ("DATABASE_URL", "not a url", ["status"], 2),
    ("DATABASE_URL", "not a url", ["runs"], 2),
    ("DATABASE_URL", "not a url", ["db", "upgrade"], 2),
    ("DATABASE_URL", "not a url", ["produce", C, "-t", T], 2),
    ("DATABASE_URL", "nosuchdb://x/y", ["run", "pause", "r1"], 2),
    ("DATABASE_URL", "postgresql+psycopg://u@127.0.0.1:1/x", ["status"], 1),
    ("DATABASE_URL", "postgresql+psycopg://u@127.0.0.1:1/x", ["produce", C, "-t", T], 1),
    ("DATA_DIR", C, ["status"], 2),
    ("DATA_DIR", C, ["produce", C, "-t", T, "--dry-run"], 2),
    ("STORAGE", "s3", ["status"], 2),
    ("REVIEW_PORT", "many", ["review"], 2),
    ("RENDER_BATCH_SIZE", "0", ["worker"], 2),
    ("BLOCKLIST_PATH", "folder", ["produce", C, "-t", T, "--dry-run"], 2),
    ("BLOCKLIST_PATH", "missing.txt", ["produce", C, "-t", T, "--dry-run"], 2),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in [n for n in os.environ if n.startswith("PIXELMILL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / T).write_text(TEMPLATES)
    (tmp_path / C).write_text("sku,title\nA,mug\nB,lamp\n")
    (tmp_path / "header.csv").write_text("sku,title\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    (tmp_path / "photo.csv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with (tmp_path / "workbook.csv").open("wb") as workbook:
        workbook.write(b"PK\x03\x04" + bytes(64))
    (tmp_path / "secret.txt").write_text("red\nblue\n")
    for folder, templates in (("outside", OUTSIDE_WILDCARD), ("escape", TEMPLATES)):
        (tmp_path / folder / "wildcards").mkdir(parents=True)
        (tmp_path / folder / T).write_text(templates)
    (tmp_path / "outside" / "wildcards" / "colours.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "escape" / T).write_text(TEMPLATES.replace("photo of a", "__../../secret__"))
    assert invoke("db", "upgrade")[0] == 0
    assert invoke("produce", C, "-t", T, "--run", "r1", "--no-dispatch")[0] == 0
    yield tmp_path


def invoke(*args: str, stdin: str = "") -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=stdin, prog_name="pixelmill")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"pixelmill {' '.join(args)} raised {result.exception!r}")
    return result.exit_code, result.output


def assert_one_line(args: list[str], code: int, out: str, expected: int) -> None:
    shown = f"pixelmill {' '.join(args)} -> {code}:\n{out}"
    assert "Traceback" not in out, shown
    assert code == expected, shown
    # Log records (key=value lines, such as alembic's at INFO) are no part of the answer.
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("ts=")]
    assert len(lines) == 1, shown
    assert lines[0].startswith("error: "), shown


def _case_id(case: tuple[list[str], int]) -> str:
    return " ".join(arg[:30] for arg in case[0])


@pytest.mark.parametrize(("args", "expected"), CORPUS, ids=[_case_id(c) for c in CORPUS])
def test_bad_input_is_one_line(workdir: Path, args: list[str], expected: int) -> None:
    code, out = invoke(*args)
    assert_one_line(args, code, out, expected)


@pytest.mark.parametrize(
    ("variable", "value", "args", "expected"),
    BAD_SETTINGS,
    ids=[f"{v}={x[:12]}-{' '.join(a)[:20]}" for v, x, a, _ in BAD_SETTINGS],
)
def test_bad_settings_are_one_line(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    args: list[str],
    expected: int,
) -> None:
    monkeypatch.setenv(f"PIXELMILL_{variable}", value)
    code, out = invoke(*args)
    assert_one_line(args, code, out, expected)
    if expected == 2 and variable != "BLOCKLIST_PATH":
        assert f"PIXELMILL_{variable}" in out


def test_bad_settings_never_echo_a_secret(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule across fields (webhook URLs without a secret) has the whole environment as its
    input, a too-short secret is itself the input, and a database URL holds a password: the
    one-line error names each variable and keeps every secret out of the output."""
    monkeypatch.setenv("PIXELMILL_S3_SECRET_ACCESS_KEY", "s3-secret-do-not-print")
    monkeypatch.setenv("PIXELMILL_WEBHOOK_URLS", "http://127.0.0.1:9/hook")
    code, out = invoke("status")
    assert_one_line(["status"], code, out, 2)
    assert "PIXELMILL_WEBHOOK_SECRET" in out or "webhook" in out.lower()
    assert "s3-secret-do-not-print" not in out

    monkeypatch.setenv("PIXELMILL_WEBHOOK_SECRET", "short-secret")
    monkeypatch.setenv("PIXELMILL_DATABASE_URL", "postgresql://u:db-password@127.0.0.1:1/x")
    monkeypatch.setenv("PIXELMILL_LOG_LEVEL", "LOUD")  # a second problem in the same error
    code, out = invoke("status")
    assert_one_line(["status"], code, out, 2)
    assert "PIXELMILL_WEBHOOK_SECRET" in out and "(value hidden)" in out
    for secret in ("short-secret", "s3-secret-do-not-print", "db-password"):
        assert secret not in out


def _leaf_commands() -> list[list[str]]:
    """Every command's path, from the registered app (so new commands are covered)."""
    from typer.main import get_command

    paths: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        children = getattr(command, "commands", None)
        if not children:
            paths.append(path)
            return
        for name, child in children.items():
            walk(child, [*path, name])

    walk(get_command(app), [])
    return paths


@pytest.mark.parametrize("path", _leaf_commands(), ids=" ".join)
def test_every_command_refuses_an_invalid_log_level_and_an_unknown_option(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, path: list[str]
) -> None:
    code, out = invoke(*path, "--no-such-option")
    assert_one_line(path, code, out, 2)

    monkeypatch.setenv("PIXELMILL_LOG_LEVEL", "LOUD")
    code, out = invoke(*path)
    assert_one_line(path, code, out, 2)
    assert "PIXELMILL_LOG_LEVEL" in out and "'LOUD'" in out


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["produce", "folder", "-t", T], {}, 2),
        (["produce", C, "-t", T, "--seeds", "1000000"], {}, 2),
        (["status"], {"PIXELMILL_LOG_LEVEL": "verbose"}, 2),
    ],
)
def test_the_entry_point_prints_no_traceback(
    workdir: Path, args: list[str], env: dict[str, str], expected: int
) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    result = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=workdir,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line(args, result.returncode, result.stdout + result.stderr, expected)
