"""Operating on runs: list, pause, resume, cancel, reprioritise.

Pausing and cancelling act within seconds because the backlog lives in Postgres, not on the
broker: the dispatcher publishes only a small window of jobs at a time, a paused run's queued
jobs go back to ``pending``, and a worker refuses to claim a job whose run is not active (its
message is then dropped harmlessly). Jobs already running finish.

Pause, resume and cancel lock the run's row before they read its status or touch its jobs, as
the dispatcher (FOR SHARE) and the workers do (see db.run_locks for the lock order): a
dispatcher queueing the run's jobs, or a worker ending its last job, commits first and is then
seen, or waits for this to commit.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from db.models import Image, Job, JobStatus, Run, RunStatus, utcnow
from db.run_locks import finish_run_if_complete, lock_loaded_run
from pixelmill.errors import BadInputError
from producer import bounds


class RunStateError(BadInputError):
    pass


@dataclass(frozen=True)
class RunSummary:
    id: int
    name: str
    status: str
    priority: int
    created_at: str
    jobs: int
    jobs_done: int
    jobs_failed: int
    images: int


def list_runs(session: Session, *, limit: int = 50) -> list[RunSummary]:
    job_counts = (
        select(
            Job.run_id,
            func.count().label("jobs"),
            func.sum(case((Job.status == JobStatus.DONE, 1), else_=0)).label("done"),
            # Every way a job can end without images: failed, dead (out of attempts), blocked.
            func.sum(
                case(
                    (Job.status.in_([JobStatus.FAILED, JobStatus.DEAD, JobStatus.BLOCKED]), 1),
                    else_=0,
                )
            ).label("failed"),
        )
        .group_by(Job.run_id)
        .subquery()
    )
    image_counts = (
        select(Job.run_id, func.count(Image.id).label("images"))
        .join(Image, Image.job_id == Job.id)
        .group_by(Job.run_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Run,
            func.coalesce(job_counts.c.jobs, 0),
            func.coalesce(job_counts.c.done, 0),
            func.coalesce(job_counts.c.failed, 0),
            func.coalesce(image_counts.c.images, 0),
        )
        .outerjoin(job_counts, job_counts.c.run_id == Run.id)
        .outerjoin(image_counts, image_counts.c.run_id == Run.id)
        .order_by(Run.id.desc())
        .limit(limit)
    ).all()
    return [
        RunSummary(
            id=run.id,
            name=run.name,
            status=run.status,
            priority=run.priority,
            created_at=f"{run.created_at:%Y-%m-%d %H:%M}",
            jobs=int(jobs),
            jobs_done=int(done),
            jobs_failed=int(failed),
            images=int(images),
        )
        for run, jobs, done, failed, images in rows
    ]


def pause_run(session: Session, run: Run) -> int:
    """Stop dispatching; returns how many queued jobs went back to pending."""
    lock_loaded_run(session, run)
    _require(run, {RunStatus.ACTIVE, RunStatus.PAUSED}, "pause")
    run.status = RunStatus.PAUSED
    requeued = _unqueue(session, run)
    session.commit()
    return requeued


def resume_run(session: Session, run: Run) -> None:
    """Dispatch the run's jobs again. A run whose jobs all ended while it was paused is
    ``finished`` instead: no job is left to end it."""
    lock_loaded_run(session, run)
    _require(run, {RunStatus.PAUSED, RunStatus.ACTIVE}, "resume")
    run.status = RunStatus.ACTIVE
    session.flush()
    finish_run_if_complete(session, run.id)
    session.commit()


def cancel_run(session: Session, run: Run) -> int:
    """Cancel every job that has not started; returns how many were cancelled."""
    lock_loaded_run(session, run)
    _require(run, {RunStatus.ACTIVE, RunStatus.PAUSED, RunStatus.CANCELLED}, "cancel")
    run.status = RunStatus.CANCELLED
    run.finished_at = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.run_id == run.id, Job.status.in_([JobStatus.PENDING, JobStatus.QUEUED]))
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
    )
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


def set_priority(session: Session, run: Run, priority: int) -> None:
    run.priority = bounds.PRIORITY.check(priority, "the priority")
    session.commit()


def _unqueue(session: Session, run: Run) -> int:
    # Their messages may still be on the broker: a worker that receives one finds the run
    # paused and drops it; after resume the dispatcher publishes the job again.
    result = session.execute(
        update(Job)
        .where(Job.run_id == run.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.PENDING, queued_at=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _require(run: Run, allowed: set[RunStatus], action: str) -> None:
    if run.status not in allowed:
        raise RunStateError(f"cannot {action} run {run.name!r}: it is {run.status}")
