"""Publish job ids to the broker, only after the database says they are queued.

The order matters: a job moves ``pending -> queued`` in a committed transaction *before* its
id is published, so a worker never receives an id whose row it cannot see. A publish that
fails (the broker is away) returns the jobs it did not send to ``pending`` at once, so they
neither hold the window nor wait for a re-publish. If the process dies between commit and
publish, the job sits in ``queued`` with no message; such jobs (and any whose message was
lost by the broker) are published again once they have waited ``requeue_after`` without being
started, but only as many as the broker is missing: the broker's count of the messages it
holds is subtracted from the queued jobs, so jobs that only wait their turn behind long jobs
are not published again and again. Re-publishing is safe: claiming is idempotent.

A pending job given back after a failed attempt waits until its ``retry_at`` (backoff).

Only a small ``window`` of jobs is on the broker at any time (a few per worker): the backlog
stays in Postgres, where it can be paused, cancelled and reprioritised. Pending jobs of
higher-priority runs are published first. Run ``pixelmill dispatch --watch`` to keep the
window topped up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, Run, RunStatus, utcnow
from pixelmill.outages import BROKER, ServiceUnavailableError, infrastructure_error
from pixelmill.tasks import RENDER_TASK
from producer import metrics

log = logging.getLogger(__name__)

Publish = Callable[[Iterable[int]], None]
# How many messages the broker holds in the render queue (ready, not yet delivered).
BrokerCount = Callable[[], int]
# A shortfall of messages is counted again after this long (see _missing_messages).
RECOUNT_AFTER_SECONDS = 0.5


class PublishError(ServiceUnavailableError):
    """The broker failed part-way through a batch: the ids in ``sent`` were published."""

    def __init__(self, cause: BaseException, sent: Sequence[int]) -> None:
        super().__init__(BROKER, cause)
        self.sent = list(sent)


@dataclass
class DispatchReport:
    published: int = 0
    republished: int = 0
    # Queued jobs whose publish failed, returned to pending.
    returned: int = 0
    # Stale queued jobs left alone because the broker still holds as many messages.
    still_held: int = 0


def dispatch(
    session: Session,
    publish: Publish,
    *,
    requeue_after: timedelta,
    batch_size: int = 500,
    run_id: int | None = None,
    window: int | None = None,
    broker_count: BrokerCount | None = None,
) -> DispatchReport:
    """Publish pending jobs (at most ``window`` queued at once, None for no limit) and
    re-publish queued jobs not started within ``requeue_after``: as many as the broker is
    missing when ``broker_count`` says how many messages it holds, else all of them.

    A failed publish returns its unsent jobs to pending and raises (a PublishError when the
    broker was unreachable)."""
    report = DispatchReport()
    # Fixed once per call: jobs re-published in this call are never "stale" again in it.
    stale_before = utcnow() - requeue_after
    while (room := _room(session, batch_size, window)) and (
        ids := _mark_queued(session, room, run_id)
    ):
        _publish(session, publish, ids, report)
        report.published += len(ids)
        metrics.JOBS_PUBLISHED.inc(len(ids))
    missing = _missing_messages(session, broker_count)
    while missing is None or missing > 0:
        limit = batch_size if missing is None else min(batch_size, missing)
        ids = _mark_stale_requeued(session, stale_before, limit, run_id)
        if not ids:
            break
        _publish(session, publish, ids, report)
        report.republished += len(ids)
        metrics.JOBS_REPUBLISHED.inc(len(ids))
        log.warning("re-published %d jobs whose messages were not picked up", len(ids))
        if missing is not None:
            missing -= len(ids)
    if missing == 0:
        report.still_held = _count_stale(session, stale_before, run_id)
    return report


def _publish(session: Session, publish: Publish, ids: list[int], report: DispatchReport) -> None:
    """Publish ``ids`` (queued and committed); if that fails, return the ones not sent to
    pending before raising, so that they are published again at the next round."""
    try:
        publish(ids)
    except Exception as exc:
        sent = set(exc.sent) if isinstance(exc, PublishError) else set()
        unsent = [job_id for job_id in ids if job_id not in sent]
        report.published += len(sent)
        metrics.JOBS_PUBLISHED.inc(len(sent))
        try:
            report.returned += return_to_pending(session, unsent)
        except Exception:  # the database is away too: they wait for requeue_after instead
            log.warning("could not return %d unpublished jobs to pending", len(unsent))
            with contextlib.suppress(Exception):
                session.rollback()
        raise


def return_to_pending(session: Session, ids: Sequence[int]) -> int:
    """Queued jobs whose message never left: back to pending (no requeue wait). Commits."""
    session.rollback()  # whatever the failed publish left open
    if not ids:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.id.in_(list(ids)), Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.PENDING, queued_at=None)
    )
    session.commit()
    returned = int(result.rowcount)  # type: ignore[attr-defined]
    metrics.JOBS_UNPUBLISHED.inc(returned)
    if returned:
        log.warning("returned %d jobs whose publish failed to pending", returned)
    return returned


def _missing_messages(session: Session, broker_count: BrokerCount | None) -> int | None:
    """How many queued jobs have no message anywhere, at most (None: not known).

    A queued job's message is on the broker (counted by it), or taken by a worker that has
    not claimed the job yet: a busy worker takes the next message before its job is done
    (up to one per pool process, the prefetch), and holds it as long as that job renders.
    So a message is counted missing only beyond one per running job: while every worker is
    busy nothing is starved for want of it, and once they are idle (nothing left on the
    broker) each lost one shows.

    The broker is asked first, then the database: a message a worker takes in between has
    its job running by then, which makes the answer low, never high. One taken just before
    the broker is asked and claimed just after the database is would make it one too high,
    so a shortfall is counted again a moment later and the smaller answer is taken: a lost
    message is missing both times. (The broker's count includes messages of jobs no longer
    queued, duplicates say: workers drop those and the count falls.) The broker delivers in
    order, so the messages it misses are the oldest jobs'."""
    if broker_count is None:
        return None
    missing = _count_missing(session, broker_count)
    if missing > 0:
        time.sleep(RECOUNT_AFTER_SECONDS)
        missing = min(missing, _count_missing(session, broker_count))
    return missing


def _count_missing(session: Session, broker_count: BrokerCount) -> int:
    held = broker_count()
    counts = dict(
        session.execute(
            select(Job.status, func.count())
            .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .group_by(Job.status)
        ).all()
    )
    session.commit()
    queued, running = counts.get(JobStatus.QUEUED, 0), counts.get(JobStatus.RUNNING, 0)
    metrics.BROKER_MESSAGES.set(held)
    metrics.JOBS_QUEUED.set(queued)
    return max(0, queued - held - running)


def _count_stale(session: Session, stale_before: datetime, run_id: int | None) -> int:
    stale = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.status == JobStatus.QUEUED, Job.queued_at < stale_before, *_active(run_id))
    )
    session.commit()
    return int(stale or 0)


def _active(run_id: int | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        Job.run_id.in_(select(Run.id).where(Run.status == RunStatus.ACTIVE))
    ]
    if run_id is not None:
        conditions.append(Job.run_id == run_id)
    return conditions


def _room(session: Session, batch_size: int, window: int | None) -> int:
    if window is None:
        return batch_size
    queued = session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
    )
    return max(0, min(batch_size, window - (queued or 0)))


def _mark_queued(session: Session, limit: int, run_id: int | None) -> list[int]:
    # The active runs' rows first, FOR SHARE until the commit: a pause or cancel of one of
    # them (which locks the run's row before its jobs) waits for these jobs to be queued and
    # then returns them to pending, or is waited for, and then the run is no longer active
    # here. Runs, then jobs: the order pause and cancel take them, so neither waits for the
    # other's second lock. Dispatchers' share locks do not conflict with each other.
    # (SQLite ignores FOR SHARE and FOR UPDATE; it serialises writers anyway.)
    active_runs = (
        select(Run.id)
        .where(Run.status == RunStatus.ACTIVE)
        .order_by(Run.id)
        .with_for_update(read=True)
    )
    if run_id is not None:
        active_runs = active_runs.where(Run.id == run_id)
    run_ids = list(session.scalars(active_runs))
    if not run_ids:
        session.commit()
        return []
    # SKIP LOCKED: two dispatchers running at once split the pending jobs between them.
    now = utcnow()
    candidates = (
        select(Job.id)
        .join(Run, Run.id == Job.run_id)
        .where(
            Job.status == JobStatus.PENDING,
            Job.run_id.in_(run_ids),
            # Given back after a failed attempt: not before its backoff is over.
            or_(Job.retry_at.is_(None), Job.retry_at <= now),
        )
        .order_by(Run.priority.desc(), Job.id)
        .limit(limit)
        .with_for_update(of=Job, skip_locked=True)
    )
    ids = list(session.scalars(candidates))
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.PENDING)
            .values(status=JobStatus.QUEUED, queued_at=now, retry_at=None)
        )
    session.commit()
    return ids


def _mark_stale_requeued(
    session: Session, stale_before: datetime, limit: int, run_id: int | None
) -> list[int]:
    now = utcnow()
    candidates = (
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.queued_at < stale_before,
            *_active(run_id),
        )
        # The longest queued first: the broker delivers in order, so theirs are the
        # messages most likely lost.
        .order_by(Job.queued_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(candidates))
    if ids:
        session.execute(
            update(Job).where(Job.id.in_(ids), Job.status == JobStatus.QUEUED).values(queued_at=now)
        )
    session.commit()
    return ids


def celery_publisher(app: Celery, queue: str) -> Publish:
    """Publish ids as render tasks over one pooled broker connection.

    ``app`` only needs a broker (:func:`pixelmill.tasks.publisher_app`): the task is sent by
    name, so the dispatcher never loads the workers' code.
    """

    def publish(ids: Iterable[int]) -> None:
        sent: list[int] = []
        try:
            with app.producer_or_acquire() as producer:
                for job_id in ids:
                    app.send_task(RENDER_TASK, args=[job_id], queue=queue, producer=producer)
                    sent.append(job_id)
        except Exception as exc:
            if infrastructure_error(exc) is None:
                raise
            raise PublishError(exc, sent) from exc

    return publish


def celery_broker_count(app: Celery, queue: str) -> BrokerCount:
    """Ask the broker how many messages ``queue`` holds (ready for a worker; not those a
    worker has taken and not yet acknowledged), over a connection of its own."""

    def count() -> int:
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0)
                with connection.channel() as channel:
                    try:
                        declared = channel.queue_declare(queue=queue, passive=True)
                    except connection.channel_errors:
                        # No such queue: nothing declared it yet, or (Redis) it is empty.
                        return 0
                    return int(declared.message_count)
        except Exception as exc:
            if infrastructure_error(exc) is None:
                raise
            raise ServiceUnavailableError(BROKER, exc) from exc

    return count
