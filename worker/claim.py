"""Claiming and finishing jobs with fenced conditional updates.

A message may be delivered more than once (acks_late, redelivery, the dispatcher's re-publish).
The claim makes that harmless: only one worker can move a job to ``running``, and every later
write is fenced on the ``attempts`` value of that claim, so a worker whose lease expired and
whose job was taken over cannot overwrite the new owner's outcome.

``attempts`` counts every claim; ``outages`` those that ended because a service (database,
broker, storage) was unreachable. Only the difference is held against ``max_attempts``, so an
outage, however many tries it lasts, makes no job dead. A job given back for another attempt
waits until its ``retry_at`` (exponential backoff with jitter, pixelmill.outages) before the
dispatcher publishes it again.

Ending or giving back a job locks its run's row after the job's (see db.run_locks for the
lock order).

Each round trip to the database is a few hundred microseconds of the render thread's time per
job (and a pool pre-ping per transaction), so a claim reads back in its one statement what the
render needs besides the job's parameters (:class:`JobDetails`), and finishing a job records
its last images in the transaction that marks it ``done``. The claim and the fenced updates
run as Core statements on the session's connection: the worker keeps no Job objects in its
sessions, and the ORM's bookkeeping for them cost more than the statements.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ClauseElement,
    ColumnElement,
    String,
    Update,
    and_,
    bindparam,
    cast,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Image, Job, JobStatus, Run, RunStatus, utcnow
from db.run_locks import finish_run_if_complete, lock_run
from pixelmill.outages import RetryBackoff


@dataclass(frozen=True)
class JobDetails:
    """What a render reads of its job besides the parameters: the names its images' metadata
    and keys carry, its kind and options (raw JSON, checked by the render), its staged images,
    and how many of its seeds already have an image (a retry, a re-roll)."""

    run_name: str
    item_key: str
    template: str
    variant: str
    kind: str
    options: Any  # the options column as stored (db.job_options.JobOptions.from_json)
    input_image: str | None
    mask_image: str | None
    images: int


# Scalar subqueries: the claim's UPDATE ... RETURNING reads them in the same round trip
# (Postgres and SQLite both allow them there).
def _detail_columns() -> tuple[Any, ...]:
    return (
        select(Run.name).where(Run.id == Job.run_id).scalar_subquery(),
        select(CatalogueItem.external_key).where(CatalogueItem.id == Job.item_id).scalar_subquery(),
        Job.template,
        Job.variant,
        Job.kind,
        Job.options,
        Job.input_image,
        Job.mask_image,
        select(func.count()).select_from(Image).where(Image.job_id == Job.id).scalar_subquery(),
    )


def _details(row: Any, start: int) -> JobDetails:
    values = tuple(row[start:])
    return JobDetails(*values[:-1], images=int(values[-1]))  # type: ignore[misc]


def read_details(session: Session, job_id: int) -> JobDetails:
    """The details :func:`claim_job` reads back, for a job claimed some other way."""
    row = session.execute(select(*_detail_columns()).where(Job.id == job_id)).one()
    return _details(row, 0)


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
    # Earlier attempts that ended on an outage (not counted against max_attempts).
    outages: int = 0
    # Read back by the claim (None for a job made some other way: see read_details).
    details: JobDetails | None = None

    @property
    def counted_attempts(self) -> int:
        """This attempt's number among those held against max_attempts."""
        return self.attempt - self.outages


def _counted_attempts() -> ColumnElement[int]:
    return Job.attempts - Job.outages


def _claimable(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    return or_(
        Job.status == JobStatus.QUEUED,
        # A pending job waiting out its retry backoff is not taken by a stray message (a
        # duplicate, a redelivery): the dispatcher publishes it when the pause is over.
        and_(
            Job.status == JobStatus.PENDING,
            or_(Job.retry_at.is_(None), Job.retry_at <= now),
        ),
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
    values: dict[str, Any] = {
        "claim_job_id": job_id,
        "claim_now": now,
        "claim_until": now + lease,
        "claim_worker": worker,
    }
    if max_attempts is not None:
        values["claim_max_attempts"] = max_attempts
    # Core, not the ORM's bulk update: the worker keeps no Job objects to synchronise.
    row = (
        session.connection()
        .execute(_claim_statement(with_max_attempts=max_attempts is not None), values)
        .one_or_none()
    )
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
        outages=row.outages,
        details=_details(row, len(_CLAIMED_COLUMNS)),
    )


@functools.cache
def _claim_statement(*, with_max_attempts: bool) -> Update:
    """The claim's UPDATE ... RETURNING, built once (its bound values are parameters): building
    and hashing the statement for every job cost more than running it."""
    now = bindparam("claim_now", type_=Job.started_at.type)
    conditions = [Job.id == bindparam("claim_job_id"), _claimable(now), _active_run()]
    if with_max_attempts:
        conditions.append(_counted_attempts() < bindparam("claim_max_attempts"))
    return (
        update(Job)
        .where(*conditions)
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            started_at=now,
            lease_expires_at=bindparam("claim_until", type_=Job.lease_expires_at.type),
            worker=bindparam("claim_worker"),
            error=None,
            retry_at=None,
        )
        .returning(*_CLAIMED_COLUMNS, *_detail_columns())
    )


# What a claim reads back of its job (ClaimedJob).
_CLAIMED_COLUMNS = (
    Job.id,
    Job.run_id,
    Job.attempts,
    Job.outages,
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


def bury_exhausted(session: Session, job_id: int, *, max_attempts: int) -> bool:
    """Make a claimable job that has had ``max_attempts`` attempts ``dead``, keeping its last
    error (or saying its last worker was lost). True if it did."""
    run_id = session.scalar(select(Job.run_id).where(Job.id == job_id))
    if run_id is None:
        session.rollback()
        return False
    # The run's row before the job's: the job is pending or queued, rows that pause and cancel
    # update while holding the run's row (see the lock order above).
    lock_run(session, run_id)
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id, _claimable(now), _active_run(), _counted_attempts() >= max_attempts
        )
        .values(
            status=JobStatus.DEAD,
            error=func.coalesce(Job.error, _lease_expired_error()),
            finished_at=now,
            lease_expires_at=None,
        )
        .returning(Job.run_id)
    ).one_or_none()
    if row is not None:
        finish_run_if_complete(session, row.run_id)
    session.commit()
    return row is not None


@dataclass(frozen=True)
class ReapReport:
    requeued: list[int] = field(default_factory=list)  # back to pending for another attempt
    dead: list[int] = field(default_factory=list)  # out of attempts
    cancelled: list[int] = field(default_factory=list)  # their run was cancelled meanwhile


def reap_expired(
    session: Session,
    *,
    max_attempts: int,
    now: datetime | None = None,
    backoff: RetryBackoff | None = None,
) -> ReapReport:
    """Running jobs whose lease expired were lost with their worker (killed, hung, cut off):
    re-queue them (``pending``, so the dispatcher publishes them again, after ``backoff``'s
    pause if given) or, once they have had ``max_attempts`` attempts, make them ``dead``.
    Each keeps an error saying what happened. A job of a cancelled run is ``cancelled``
    instead of re-queued: nothing would run it.

    A worker that is in fact still running such a job is fenced off (its claim's status and
    attempt no longer match), so it stops before its next batch of seeds and records nothing more.
    """
    now = utcnow() if now is None else now
    expired = [Job.status == JobStatus.RUNNING, Job.lease_expires_at < now]
    dead_rows = session.execute(
        update(Job)
        .where(*expired, _counted_attempts() >= max_attempts)
        .values(
            status=JobStatus.DEAD,
            error=_lease_expired_error(),
            finished_at=now,
            lease_expires_at=None,
        )
        .returning(Job.id, Job.run_id)
    ).all()
    requeued_rows = session.execute(
        update(Job)
        .where(*expired, _counted_attempts() < max_attempts)
        .values(
            status=JobStatus.PENDING,
            error=_lease_expired_error(),
            lease_expires_at=None,
            queued_at=None,
        )
        .returning(Job.id, Job.run_id, Job.attempts)
    ).all()
    requeued_by_run: dict[int, list[int]] = {}
    for row in requeued_rows:
        requeued_by_run.setdefault(row.run_id, []).append(row.id)
    dead_runs = {row.run_id for row in dead_rows}
    cancelled: list[int] = []
    # One run at a time, in id order: two reapers lock the runs they share in the same order.
    for run_id in sorted(dead_runs | set(requeued_by_run)):
        cancelled += _cancel_if_run_cancelled(session, run_id, requeued_by_run.get(run_id, []))
        if run_id in dead_runs:
            finish_run_if_complete(session, run_id)
    requeued = {row.id for row in requeued_rows} - set(cancelled)
    if backoff is not None and requeued:
        _back_off(session, [(r.id, r.attempts) for r in requeued_rows if r.id in requeued], backoff)
    session.commit()
    return ReapReport(
        requeued=sorted(requeued),
        dead=sorted(row.id for row in dead_rows),
        cancelled=sorted(cancelled),
    )


def _back_off(session: Session, tries: list[tuple[int, int]], backoff: RetryBackoff) -> None:
    """Give each (job id, attempts so far) its own pause: jitter spreads jobs that failed
    together (a worker lost with its batch, an outage) over the pause."""
    now = utcnow()
    session.execute(
        update(Job),
        [{"id": job_id, "retry_at": now + backoff.delay(attempts)} for job_id, attempts in tries],
    )


def _fenced(job: ClaimedJob) -> list[ColumnElement[bool]]:
    return [Job.id == job.id, Job.status == JobStatus.RUNNING, Job.attempts == job.attempt]


def _fenced_update(session: Session, job: ClaimedJob, **values: Any) -> bool:
    """Update the job's row if the job is still ours (Core: no ORM synchronisation); whether
    it was. Plain values go through a statement built once per set of columns (a heartbeat,
    a job done); SQL expressions (``Job.outages + 1``) through one built for the call."""
    if any(isinstance(value, ClauseElement) for value in values.values()):
        statement = update(Job).where(*_fenced(job)).values(**values)
        result = session.connection().execute(statement)
    else:
        parameters = {f"set_{column}": value for column, value in values.items()}
        parameters |= {"fence_job_id": job.id, "fence_attempt": job.attempt}
        statement = _fenced_statement(tuple(sorted(values)))
        result = session.connection().execute(statement, parameters)
    return bool(result.rowcount)


@functools.cache
def _fenced_statement(columns: tuple[str, ...]) -> Update:
    """The fenced UPDATE of ``columns``, its values and fence as parameters: as for the claim,
    building and hashing the statement for each job cost more than running it."""
    table = Job.__table__
    values = {column: bindparam(f"set_{column}", type_=table.c[column].type) for column in columns}
    return (
        update(Job)
        .where(
            Job.id == bindparam("fence_job_id"),
            Job.status == JobStatus.RUNNING,
            Job.attempts == bindparam("fence_attempt"),
        )
        .values(values)
    )


def extend_lease(session: Session, job: ClaimedJob, lease: timedelta) -> bool:
    """Heartbeat: push the lease forward. False if the job is no longer ours."""
    ours = _fenced_update(session, job, lease_expires_at=utcnow() + lease)
    session.commit()
    return ours


def hold_lease(session: Session, job: ClaimedJob, lease: timedelta) -> bool:
    """Push the lease forward inside the caller's transaction, which then holds the job's row
    lock until it commits: writes made in that transaction (image rows) are recorded only if
    the job is still ours. False (nothing changed) if it is not."""
    return _fenced_update(session, job, lease_expires_at=utcnow() + lease)


def finish_job(
    session: Session, job: ClaimedJob, *, record: Callable[[], None] | None = None
) -> bool:
    """Mark the job ``done``. ``record`` first writes, in the same transaction, what must be
    durable with it (its last images' rows): committed together with ``done``, or, when the
    job is no longer ours, rolled back with it (False)."""
    if record is not None:
        record()
    if not _fenced_update(
        session, job, status=JobStatus.DONE, finished_at=utcnow(), lease_expires_at=None
    ):
        session.rollback()
        return False
    finish_run_if_complete(session, job.run_id)
    session.commit()
    return True


def _cancel_if_run_cancelled(session: Session, run_id: int, job_ids: Collection[int]) -> list[int]:
    """Jobs just given back to ``pending`` whose run is cancelled would never run: cancel them
    as cancel_run did the run's other jobs. Returns their ids. Locks the run's row first, so
    a cancel that has not committed yet is waited for; one that commits after this sees the
    jobs pending and cancels them itself."""
    if not job_ids or lock_run(session, run_id) != RunStatus.CANCELLED:
        return []
    cancelled = session.scalars(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.PENDING)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
        .returning(Job.id)
    ).all()
    return list(cancelled)


def fail_job(
    session: Session, job: ClaimedJob, error: str, *, status: JobStatus = JobStatus.FAILED
) -> bool:
    """End the job as ``status`` (failed, dead or blocked) with ``error``. False if the job
    is no longer ours."""
    if status not in (JobStatus.FAILED, JobStatus.DEAD, JobStatus.BLOCKED):
        raise ValueError(f"fail_job cannot end a job as {status!r}")
    ours = _fenced_update(
        session, job, status=status, error=error[:4000], finished_at=utcnow(), lease_expires_at=None
    )
    finish_run_if_complete(session, job.run_id)
    session.commit()
    return ours


def release_job(
    session: Session,
    job: ClaimedJob,
    error: str,
    *,
    retry_in: timedelta | None = None,
    outage: bool = False,
) -> bool:
    """Give the job back for another attempt (``pending``: the dispatcher publishes it again
    once ``retry_in`` has passed), keeping ``error``. With ``outage`` (a service was
    unreachable) this attempt is not counted against max_attempts. Images already recorded
    stay: the next attempt renders the rest. If its run was cancelled meanwhile, the job is
    ``cancelled`` instead. False if the job is no longer ours."""
    counted: dict[str, Any] = {"outages": Job.outages + 1} if outage else {}
    ours = _fenced_update(
        session,
        job,
        status=JobStatus.PENDING,
        error=error[:4000],
        lease_expires_at=None,
        queued_at=None,
        retry_at=None if retry_in is None else utcnow() + retry_in,
        **counted,
    )
    if ours:
        _cancel_if_run_cancelled(session, job.run_id, [job.id])
    session.commit()
    return ours
