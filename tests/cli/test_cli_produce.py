"""`pixelmill produce` exit statuses, --strict, --max-jobs, --dry-run, and `runs` / `run ...`,
in process on a SQLite database of the test's own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.common import EXIT_PARTIAL, EXIT_REFUSED
from cli.main import app

TEMPLATES = """key: sku
defaults: {steps: 2, width: 64, height: 64, seeds: 2}
templates:
  studio:
    prompt: "photo of a {{ colour }} {{ title }}"
"""

CLEAN = "sku,title,colour\nA,mug,red\nB,lamp,black\n"
# Line 3 (B) has an empty colour, which the template needs.
ONE_BAD = "sku,title,colour\nA,mug,red\nB,lamp,\nC,chair,green\n"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "MODEL", "BLOCKLIST_PATH"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    assert invoke("db", "upgrade")[0] == 0
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def produce(catalogue: str, *args: str) -> tuple[int, str]:
    code, out = invoke("produce", catalogue, "--template", "templates.yaml", "--no-dispatch", *args)
    return code, " ".join(out.split())  # rich may break long lines


def query(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def counts(workdir: Path) -> tuple[int, int, int]:
    db = workdir / "var" / "pixelmill.db"
    return tuple(  # type: ignore[return-value]
        query(db, f"SELECT count(*) FROM {table}")[0][0]
        for table in ("runs", "catalogue_items", "jobs")
    )


def run_status(workdir: Path, name: str) -> str:
    rows = query(workdir / "var" / "pixelmill.db", f"SELECT status FROM runs WHERE name = '{name}'")
    assert len(rows) == 1, rows
    return str(rows[0][0])


def job_statuses(workdir: Path) -> list[str]:
    rows = query(workdir / "var" / "pixelmill.db", "SELECT status FROM jobs ORDER BY id")
    return [str(row[0]) for row in rows]


# --------------------------------------------------------------------------- produce


def test_clean_catalogue_exits_0(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(CLEAN)

    code, out = produce("cat.csv", "--run", "r1", "--priority", "4")

    assert code == 0, out
    assert "2 rows, 2 items, 0 rows skipped; 2 new jobs, 0 unchanged, 4 images planned" in out
    assert counts(workdir) == (1, 2, 2)
    assert query(workdir / "var" / "pixelmill.db", "SELECT name, status, priority FROM runs") == [
        ("r1", "active", 4)
    ]
    assert job_statuses(workdir) == ["pending", "pending"]


def test_bad_row_exits_partial_and_writes_the_good_rows(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(ONE_BAD)

    code, out = produce("cat.csv", "--run", "r1")

    assert code == EXIT_PARTIAL == 3, out
    assert "cat.csv:3: field 'colour'" in out
    assert "1 rows skipped" in out
    assert counts(workdir) == (1, 2, 2)
    prompts = query(workdir / "var" / "pixelmill.db", "SELECT prompt FROM jobs ORDER BY id")
    assert prompts == [("photo of a red mug",), ("photo of a green chair",)]


def test_strict_with_a_bad_row_exits_2_and_writes_nothing(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(ONE_BAD)

    code, out = produce("cat.csv", "--strict")

    assert code == EXIT_REFUSED == 2, out
    assert "cat.csv:3: field 'colour'" in out
    assert "nothing was written" in out
    assert counts(workdir) == (0, 0, 0)


def test_max_jobs_too_small_exits_2_and_writes_nothing(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(CLEAN)

    code, out = produce("cat.csv", "--max-jobs", "1")

    assert code == EXIT_REFUSED, out
    assert "--max-jobs" in out
    assert "cat.csv:3" in out  # the row that went over the limit
    assert "nothing was written" in out
    assert counts(workdir) == (0, 0, 0)


def test_max_jobs_exactly_enough_is_fine(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(CLEAN)

    code, out = produce("cat.csv", "--max-jobs", "2")

    assert code == 0, out
    assert counts(workdir) == (1, 2, 2)


def test_dry_run_prints_totals_and_writes_nothing(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(CLEAN)

    code, out = produce("cat.csv", "--dry-run")

    assert code == 0, out
    assert "dry run (nothing written)" in out
    assert "2 rows, 2 items, 0 rows skipped, 2 jobs, 4 images" in out
    assert "photo of a red mug" in out and "photo of a black lamp" in out
    assert counts(workdir) == (0, 0, 0)


# --------------------------------------------------------------------------- runs


def test_runs_lists_the_run(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (workdir / "cat.csv").write_text(CLEAN)
    assert produce("cat.csv", "--run", "nightly")[0] == 0

    code, out = invoke("runs")

    assert code == 0, out
    assert "nightly" in out
    assert "active" in out
    lines = [line for line in out.splitlines() if "nightly" in line]
    assert len(lines) == 1
    cells = lines[0].split()
    # id, name, status, priority, created (date and time), jobs, done, failed, images
    assert cells[:4] == ["1", "nightly", "active", "0"]
    assert cells[-4:] == ["2", "0", "0", "0"]


def test_pause_resume_cancel_change_the_run_status(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(CLEAN)
    assert produce("cat.csv", "--run", "nightly")[0] == 0

    code, out = invoke("run", "pause", "nightly")
    assert code == 0, out
    assert "paused" in out
    assert run_status(workdir, "nightly") == "paused"

    code, out = invoke("run", "resume", "nightly")
    assert code == 0, out
    assert run_status(workdir, "nightly") == "active"

    code, out = invoke("run", "cancel", "nightly")
    assert code == 0, out
    assert "2 jobs will not render" in " ".join(out.split())
    assert run_status(workdir, "nightly") == "cancelled"
    assert job_statuses(workdir) == ["cancelled", "cancelled"]

    code, out = invoke("run", "resume", "nightly")
    assert code == 1
    assert "cannot resume" in out
    assert run_status(workdir, "nightly") == "cancelled"


def test_run_by_id_and_priority(workdir: Path) -> None:
    (workdir / "cat.csv").write_text(CLEAN)
    assert produce("cat.csv", "--run", "nightly")[0] == 0

    code, out = invoke("run", "priority", "1", "9")

    assert code == 0, out
    rows = query(workdir / "var" / "pixelmill.db", "SELECT priority FROM runs")
    assert rows == [(9,)]


def test_run_pause_unknown_run_exits_1(workdir: Path) -> None:
    code, out = invoke("run", "pause", "nope")

    assert code == 1
    assert "no run 'nope'" in out


def test_image_templates_dry_run_fetches_nothing_and_the_run_stages_images(
    workdir: Path,
) -> None:
    from tests.producer.image_server import png

    (workdir / "photos").mkdir()
    (workdir / "photos" / "a.png").write_bytes(png(64, 64))
    (workdir / "templates.yaml").write_text(
        TEMPLATES + '  remix:\n    kind: img2img\n    image: photo\n    prompt: "a {{ title }}"\n'
    )
    (workdir / "cat.csv").write_text(
        "sku,title,colour,photo\nA,mug,red,photos/a.png\nB,lamp,black,photos/gone.png\n"
    )

    code, out = produce("cat.csv", "--dry-run")

    assert code == 0, out
    assert "catalogue images: 2 distinct, not fetched on a dry run" in out
    assert not (workdir / "var" / "images").exists()

    code, out = produce("cat.csv", "--run", "r1")

    assert code == EXIT_PARTIAL, out
    assert "cat.csv:3: field 'photo': item 'B':" in out and "gone.png: no such file" in out
    assert "catalogue images: 2 distinct, 1 fetched, 0 staged by an earlier run, 1 failed" in out
    assert counts(workdir) == (1, 1, 2)
    assert len(list((workdir / "var" / "images" / "inputs").glob("*/*.png"))) == 1
