"""Claiming and finishing jobs with fenced conditional updates.

A message may be delivered more than once (acks_late, redelivery, the dispatcher's re-publish).
The claim makes that harmless: only one worker can move a job to ``running``, and every later
write is fenced on the ``attempts`` value of that claim, so a worker whose lease expired and
whose job was taken over cannot overwrite the new owner's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, Run, RunStatus, utcnow


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    run_id: int
    attempt: int
    prompt: str
    negative_prompt: str
    model: str
    scheduler: str | None
    steps: int
    guidance: float
    width: int
    height: int
    seeds: list[int]


def claim_job(session: Session, job_id: int, *, worker: str, lease: timedelta) -> ClaimedJob | None:
    """Move the job to ``running`` if nobody holds it; None if it is done or held elsewhere."""
    now = utcnow()
    claimable = or_(
        Job.status.in_([JobStatus.PENDING, JobStatus.QUEUED]),
        # A running job whose lease ran out was lost with its worker: take it over.
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
    )
    active_run = Job.run_id.in_(select(Run.id).where(Run.status == RunStatus.ACTIVE))
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, active_run)
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            started_at=now,
            lease_expires_at=now + lease,
            worker=worker,
            error=None,
        )
        .returning(
            Job.id,
            Job.run_id,
            Job.attempts,
            Job.prompt,
            Job.negative_prompt,
            Job.model,
            Job.scheduler,
            Job.steps,
            Job.guidance,
            Job.width,
            Job.height,
            Job.seeds,
        )
    ).one_or_none()
    session.commit()
    if row is None:
        return None
    return ClaimedJob(
        id=row.id,
        run_id=row.run_id,
        attempt=row.attempts,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        model=row.model,
        scheduler=row.scheduler,
        steps=row.steps,
        guidance=row.guidance,
        width=row.width,
        height=row.height,
        seeds=[int(s) for s in row.seeds],
    )


def _fenced(job: ClaimedJob) -> list[ColumnElement[bool]]:
    return [Job.id == job.id, Job.status == JobStatus.RUNNING, Job.attempts == job.attempt]


def extend_lease(session: Session, job: ClaimedJob, lease: timedelta) -> bool:
    """Heartbeat: push the lease forward. False if the job is no longer ours."""
    result = session.execute(
        update(Job).where(*_fenced(job)).values(lease_expires_at=utcnow() + lease)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_job(session: Session, job: ClaimedJob) -> bool:
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(*_fenced(job))
        .values(status=JobStatus.DONE, finished_at=now, lease_expires_at=None)
    )
    _finish_run_if_complete(session, job.run_id)
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _finish_run_if_complete(session: Session, run_id: int) -> None:
    """The last job of an active run to end marks the run finished."""
    open_jobs = select(Job.id).where(
        Job.run_id == run_id,
        Job.status.in_([JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING]),
    )
    session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.ACTIVE, ~open_jobs.exists())
        .values(status=RunStatus.FINISHED, finished_at=utcnow())
    )


def fail_job(session: Session, job: ClaimedJob, error: str) -> bool:
    result = session.execute(
        update(Job)
        .where(*_fenced(job))
        .values(
            status=JobStatus.FAILED, error=error[:4000], finished_at=utcnow(), lease_expires_at=None
        )
    )
    _finish_run_if_complete(session, job.run_id)
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]
