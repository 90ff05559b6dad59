"""`pixelmill status RUN --watch`: the moving rate, the ETA, the polling loop (on Postgres) and
the command (in process, on SQLite, while another thread finishes the run)."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli.main import app
from db.models import Image, JobStatus, Run
from monitoring.status import ProgressRate, RunStatusReport, watch_run
from tests.factories import add_job, image_row


def test_rate_and_eta_follow_the_recent_window() -> None:
    rate = ProgressRate(window=60)
    assert rate.per_second() is None and rate.eta_seconds(10) is None
    rate.add(0, 0)
    rate.add(30, 60)  # 2 images/s
    assert rate.per_second() == 2
    assert rate.eta_seconds(100) == 50
    assert rate.eta_seconds(0) == 0
    # The workers slow down: after the window has passed, only the recent pace counts.
    rate.add(90, 90)
    rate.add(150, 120)
    assert rate.per_second() == pytest.approx(0.5)
    assert rate.eta_seconds(30) == pytest.approx(60)
    rate.add(210, 120)  # stalled
    rate.add(280, 120)
    assert rate.per_second() == 0
    assert rate.eta_seconds(30) is None


def _image(job_id: int, seed: int) -> Image:
    return image_row(job_id, seed)


def test_watch_polls_until_no_job_is_open(
    db_session: Session, pg_sessions: sessionmaker[Session]
) -> None:
    run = Run(name="watched", source="cat.csv")
    db_session.add(run)
    db_session.flush()
    jobs = [add_job(db_session, run, JobStatus.QUEUED, [1, 2]) for _ in range(2)]
    db_session.commit()
    now = [0.0]
    seen: list[tuple[int, int, float | None, float | None]] = []

    def show(report: RunStatusReport, rate: ProgressRate) -> None:
        remaining = report.images_planned - report.images
        seen.append((report.images, report.images_planned, rate.per_second(),
                     rate.eta_seconds(remaining)))  # fmt: skip

    def sleep(seconds: float) -> None:
        """Between two polls the workers make one image per second of the interval."""
        now[0] += seconds
        made = len(seen)  # one image per poll so far
        job = jobs[(made - 1) // 2]
        with pg_sessions() as session:
            session.add(_image(job.id, job.seeds[(made - 1) % 2]))
            if made % 2 == 0:
                session.get_one(type(job), job.id).status = JobStatus.DONE
            session.commit()

    final = watch_run(
        pg_sessions, run.id, interval=1.0, show=show, clock=lambda: now[0], sleep=sleep
    )
    assert final.finished and final.images == 4
    assert [images for images, *_ in seen] == [0, 1, 2, 3, 4]
    assert seen[0][2:] == (None, None)  # one sample: no rate yet
    assert seen[2][2:] == (1.0, 2.0)  # 1 image/s, 2 left
    assert seen[-1][2:] == (1.0, 0.0)


TEMPLATES = """key: sku
defaults: {steps: 2, width: 64, height: 64}
templates:
  studio:
    prompt: "photo of a {{ title }}"
"""


def _finish_run_slowly(db: Path, run_name: str, delay: float) -> None:
    """Another process's work: images appear, then the jobs are done."""
    time.sleep(delay)
    with sqlite3.connect(db, timeout=30) as conn:
        (run_id,) = conn.execute("SELECT id FROM runs WHERE name = ?", (run_name,)).fetchone()
        jobs = conn.execute("SELECT id, seeds FROM jobs WHERE run_id = ?", (run_id,)).fetchall()
        now = datetime.now(UTC).isoformat()
        for job_id, seeds in jobs:
            for seed in seeds.strip("[]").split(","):
                conn.execute(
                    "INSERT INTO images (job_id, seed, storage_key, sha256, width, height, bytes,"
                    " safety, render_seconds, created_at) VALUES (?, ?, 'k', 'x', 64, 64, 1,"
                    " 'safe', 0.1, ?)",
                    (job_id, int(seed), now),
                )
            conn.execute("UPDATE jobs SET status = 'done' WHERE id = ?", (job_id,))


def test_status_watch_command_shows_progress_until_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "MODEL"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    (tmp_path / "cat.csv").write_text("sku,title\nA,mug\nB,lamp\n")
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    produced = runner.invoke(
        app,
        ["produce", "cat.csv", "--template", "templates.yaml", "--seeds", "3", "--run", "r1",
         "--no-dispatch"],
    )  # fmt: skip
    assert produced.exit_code == 0, produced.output
    worker = threading.Thread(
        target=_finish_run_slowly, args=(tmp_path / "var" / "pixelmill.db", "r1", 1.0)
    )
    worker.start()
    try:
        result = runner.invoke(app, ["status", "r1", "--watch", "--interval", "0.2"])
    finally:
        worker.join()
    assert result.exit_code == 0, result.output
    assert "run 'r1'" in result.output
    assert "6/6" in result.output and "done" in result.output
    assert "/min" in result.output  # the rate, measured while the images appeared
    assert "images: 6 of 6 planned" in result.output  # then the usual report


def test_status_watch_of_unknown_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIXELMILL_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["status", "nope", "--watch"])
    assert result.exit_code == 1
    assert "no run 'nope'" in result.output
