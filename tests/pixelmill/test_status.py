"""pixelmill status: jobs by status, images made and planned, failures, on Postgres."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from db.models import CatalogueItem, Image, Job, JobStatus, Run, SafetyStatus
from pixelmill.status import find_run, run_status


def add_job(
    session: Session, run: Run, status: str, seeds: list[int], error: str | None = None
) -> Job:
    item = CatalogueItem(
        source="s", external_key=uuid.uuid4().hex, fields={}, content_hash=uuid.uuid4().hex
    )
    session.add(item)
    session.flush()
    job = Job(
        run_id=run.id,
        item_id=item.id,
        template="t",
        prompt="p",
        model="m",
        steps=2,
        guidance=7.0,
        width=64,
        height=64,
        seeds=seeds,
        status=status,
        error=error,
        dedupe_key=uuid.uuid4().hex,
    )
    session.add(job)
    session.flush()
    return job


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
