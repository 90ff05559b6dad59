"""The command line, in process, on a SQLite database of the test's own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

TEMPLATES = """key: sku
defaults: {steps: 2, width: 64, height: 64}
templates:
  studio:
    prompt: "photo of a {{ colour }} {{ title }}"
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "MODEL"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        value: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return value


def test_produce_then_status(workdir: Path) -> None:
    assert invoke("db", "upgrade")[0] == 0
    (workdir / "cat.csv").write_text("sku,title,colour\nA,mug,red\nB,lamp,black\n")
    code, out = invoke(
        "produce",
        "cat.csv",
        "--template",
        "templates.yaml",
        "--seeds",
        "3",
        "--run",
        "r1",
        "--no-dispatch",
    )
    assert code == 0, out
    assert "2 rows, 2 items, 0 rows skipped; 2 new jobs, 0 unchanged, 6 images planned" in out
    code, out = invoke("status", "r1")
    assert code == 0
    assert "pending" in out and "images: 0 of 6 planned" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"sku,title\nA,mug\n", "cat.csv:1: field 'colour': column required by template"),
        (b"", "cat.csv:1: file is empty"),
        (b"sku,title,colour\nA,mug,red\nB,lamp,\xff\xfe\n", "cat.csv:3: not valid utf-8"),
    ],
    ids=["missing-column", "empty-file", "not-utf8"],
)
def test_malformed_catalogue_names_file_line_field_and_writes_nothing(
    workdir: Path, content: bytes, message: str
) -> None:
    assert invoke("db", "upgrade")[0] == 0
    (workdir / "cat.csv").write_bytes(content)
    code, out = invoke("produce", "cat.csv", "--template", "templates.yaml", "--no-dispatch")
    assert code == 2
    assert message in " ".join(out.split())
    assert "nothing was written" in out
    db = workdir / "var" / "pixelmill.db"
    assert (count(db, "runs"), count(db, "catalogue_items"), count(db, "jobs")) == (0, 0, 0)


def test_status_of_unknown_run_fails(workdir: Path) -> None:
    assert invoke("db", "upgrade")[0] == 0
    code, out = invoke("status", "nope")
    assert code == 1 and "no run 'nope'" in out


@pytest.mark.parametrize("group", [[], ["model"], ["run"], ["reviewer"], ["rank"], ["webhooks"]])
def test_help_lists_each_command_on_one_line_of_a_wide_terminal(
    group: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command's line in a listing holds its whole first paragraph as flowing text, wrapped
    only at the terminal's width (docstrings' own line breaks used to cut it)."""
    import typer.main

    command = typer.main.get_command(app)
    for name in group:
        command = command.commands[name]  # type: ignore[attr-defined]
    monkeypatch.setenv("COLUMNS", "400")
    code, output = invoke(*group, "--help")
    assert code == 0
    listing = output.split("Commands", 1)[1]
    rows = [line.strip("│ ") for line in listing.splitlines() if line.startswith("│")]
    rows = [row for row in rows if row]
    assert [row.split()[0] for row in rows] == list(command.commands), output  # type: ignore[attr-defined]
