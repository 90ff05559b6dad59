"""Claiming and finishing jobs with fenced conditional updates.

A message may be delivered more than once (acks_late, redelivery, the dispatcher's re-publish).
The claim makes that harmless: only one worker can move a job to ``running``, and every later
write is fenced on the ``attempts`` value of that claim, so a worker whose lease expired and
whose job was taken over cannot overwrite the new owner's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, String, and_, cast, func, literal, or_, select, update
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


def _claimable(now: datetime) -> ColumnElement[bool]:
    return or_(
        Job.status.in_([JobStatus.PENDING, JobStatus.QUEUED]),
        # A running job whose lease ran out was lost with its worker: take it over.
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
    )


def _active_run() -> ColumnElement[bool]:
    return Job.run_id.in_(select(Run.id).where(Run.status == RunStatus.ACTIVE))


def _lease_expired_error() -> ColumnElement[str]:
    """The error a job lost with its worker is left with: names the attempt and the worker."""
    return (
        literal("lease expired: worker ", String)
        + func.coalesce(Job.worker, "?")
        + literal(" stopped during attempt ", String)
        + cast(Job.attempts, String)
    )


def claim_job(
    session: Session,
    job_id: int,
    *,
    worker: str,
    lease: timedelta,
    max_attempts: int | None = None,
) -> ClaimedJob | None:
    """Move the job to ``running`` if nobody holds it; None if it is done or held elsewhere,
    or (with ``max_attempts``) if it has already been attempted that often: see
    :func:`bury_exhausted`."""
    now = utcnow()
    conditions = [Job.id == job_id, _claimable(now), _active_run()]
    if max_attempts is not None:
        conditions.append(Job.attempts < max_attempts)
    row = session.execute(
        update(Job)
        .where(*conditions)
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


def bury_exhausted(session: Session, job_id: int, *, max_attempts: int) -> bool:
    """Make a claimable job that has had ``max_attempts`` attempts ``dead``, keeping its last
    error (or saying its last worker was lost). True if it did."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, _claimable(now), _active_run(), Job.attempts >= max_attempts)
        .values(
            status=JobStatus.DEAD,
            error=func.coalesce(Job.error, _lease_expired_error()),
            finished_at=now,
            lease_expires_at=None,
        )
        .returning(Job.run_id)
    ).one_or_none()
    if row is not None:
        _finish_run_if_complete(session, row.run_id)
    session.commit()
    return row is not None


@dataclass(frozen=True)
class ReapReport:
    requeued: list[int] = field(default_factory=list)  # back to pending for another attempt
    dead: list[int] = field(default_factory=list)  # out of attempts


def reap_expired(session: Session, *, max_attempts: int, now: datetime | None = None) -> ReapReport:
    """Running jobs whose lease expired were lost with their worker (killed, hung, cut off):
    re-queue them (``pending``, so the dispatcher publishes them again) or, once they have had
    ``max_attempts`` attempts, make them ``dead``. Each keeps an error saying what happened.

    A worker that is in fact still running such a job is fenced off (its claim's status and
    attempt no longer match), so it stops at its next seed and records nothing more.
    """
    now = utcnow() if now is None else now
    expired = [Job.status == JobStatus.RUNNING, Job.lease_expires_at < now]
    dead_rows = session.execute(
        update(Job)
        .where(*expired, Job.attempts >= max_attempts)
        .values(
            status=JobStatus.DEAD,
            error=_lease_expired_error(),
            finished_at=now,
            lease_expires_at=None,
        )
        .returning(Job.id, Job.run_id)
    ).all()
    requeued = session.scalars(
        update(Job)
        .where(*expired, Job.attempts < max_attempts)
        .values(
            status=JobStatus.PENDING,
            error=_lease_expired_error(),
            lease_expires_at=None,
            queued_at=None,
        )
        .returning(Job.id)
    ).all()
    for run_id in {row.run_id for row in dead_rows}:
        _finish_run_if_complete(session, run_id)
    session.commit()
    return ReapReport(requeued=sorted(requeued), dead=sorted(row.id for row in dead_rows))


def _fenced(job: ClaimedJob) -> list[ColumnElement[bool]]:
    return [Job.id == job.id, Job.status == JobStatus.RUNNING, Job.attempts == job.attempt]


def extend_lease(session: Session, job: ClaimedJob, lease: timedelta) -> bool:
    """Heartbeat: push the lease forward. False if the job is no longer ours."""
    result = session.execute(
        update(Job).where(*_fenced(job)).values(lease_expires_at=utcnow() + lease)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def hold_lease(session: Session, job: ClaimedJob, lease: timedelta) -> bool:
    """Push the lease forward inside the caller's transaction, which then holds the job's row
    lock until it commits: writes made in that transaction (image rows) are recorded only if
    the job is still ours. False (nothing changed) if it is not."""
    result = session.execute(
        update(Job).where(*_fenced(job)).values(lease_expires_at=utcnow() + lease)
    )
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


def fail_job(
    session: Session, job: ClaimedJob, error: str, *, status: JobStatus = JobStatus.FAILED
) -> bool:
    """End the job as ``status`` (failed, dead or blocked) with ``error``. False if the job
    is no longer ours."""
    if status not in (JobStatus.FAILED, JobStatus.DEAD, JobStatus.BLOCKED):
        raise ValueError(f"fail_job cannot end a job as {status!r}")
    result = session.execute(
        update(Job)
        .where(*_fenced(job))
        .values(status=status, error=error[:4000], finished_at=utcnow(), lease_expires_at=None)
    )
    _finish_run_if_complete(session, job.run_id)
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_job(session: Session, job: ClaimedJob, error: str) -> bool:
    """Give the job back for another attempt (``pending``: the dispatcher publishes it again),
    keeping ``error``. Images already recorded stay: the next attempt renders the rest.
    False if the job is no longer ours."""
    result = session.execute(
        update(Job)
        .where(*_fenced(job))
        .values(status=JobStatus.PENDING, error=error[:4000], lease_expires_at=None, queued_at=None)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]
