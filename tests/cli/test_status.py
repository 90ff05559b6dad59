"""pixelmill status: jobs by status, images made and planned, failures, on Postgres."""

from __future__ import annotations

from sqlalchemy.orm import Session

from db.models import Image, JobStatus, Run, SafetyStatus
from db.runs import find_run
from monitoring.status import run_status
from tests.factories import add_job


def test_run_status_counts_jobs_images_and_failures(db_session: Session) -> None:
    run = Run(name="nightly", source="cat.csv")
    other = Run(name="other", source="cat.csv")
    db_session.add_all([run, other])
    db_session.flush()
    done = add_job(db_session, run, JobStatus.DONE, [1, 2, 3])
    add_job(db_session, run, JobStatus.PENDING, [4, 5])
    add_job(db_session, run, JobStatus.FAILED, [6], error="OutOfMemoryError: CUDA")
    add_job(db_session, other, JobStatus.DONE, [7, 8, 9, 10])
    for seed in (1, 2, 3):
        db_session.add(
            Image(
                job_id=done.id,
                seed=seed,
                storage_key=f"k{seed}",
                sha256="x",
                width=64,
                height=64,
                bytes=10,
                safety=SafetyStatus.SAFE,
                render_seconds=0.1,
            )
        )
    db_session.commit()

    report = run_status(db_session, run)

    assert report.jobs == {"done": 1, "pending": 1, "failed": 1}
    assert (report.images, report.images_planned) == (3, 6)
    assert report.failures == [(report.failures[0][0], "OutOfMemoryError: CUDA")]
    assert not report.finished  # a job is still pending


def test_find_run_by_name_id_or_latest(db_session: Session) -> None:
    first, second = Run(name="a", source="s"), Run(name="b", source="s")
    db_session.add_all([first, second])
    db_session.flush()
    assert find_run(db_session, "a") is first
    assert find_run(db_session, str(second.id)) is second
    assert find_run(db_session, None) is second
    assert find_run(db_session, "nope") is None
