"""Publish job ids to the broker, only after the database says they are queued.

The order matters: a job moves ``pending -> queued`` in a committed transaction *before* its
id is published, so a worker never receives an id whose row it cannot see. If the process dies
between commit and publish, the job sits in ``queued`` with no message; such jobs (and any whose
message was lost by the broker) are published again once they have waited
``requeue_after`` without being started. Re-publishing is safe: claiming is idempotent.

Only a small ``window`` of jobs is on the broker at any time (a few per worker): the backlog
stays in Postgres, where it can be paused, cancelled and reprioritised. Pending jobs of
higher-priority runs are published first. Run ``pixelmill dispatch --watch`` to keep the
window topped up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, Run, RunStatus, utcnow
from monitoring.dispatcher_metrics import JOBS_PUBLISHED, JOBS_REPUBLISHED

log = logging.getLogger(__name__)

Publish = Callable[[Iterable[int]], None]


@dataclass
class DispatchReport:
    published: int = 0
    republished: int = 0


def dispatch(
    session: Session,
    publish: Publish,
    *,
    requeue_after: timedelta,
    batch_size: int = 500,
    run_id: int | None = None,
    window: int | None = None,
) -> DispatchReport:
    """Publish pending jobs (at most ``window`` queued at once, None for no limit) and
    re-publish queued jobs not started within ``requeue_after``."""
    report = DispatchReport()
    # Fixed once per call: jobs re-published in this call are never "stale" again in it.
    stale_before = utcnow() - requeue_after
    while (room := _room(session, batch_size, window)) and (
        ids := _mark_queued(session, room, run_id)
    ):
        publish(ids)
        report.published += len(ids)
        JOBS_PUBLISHED.inc(len(ids))
    while ids := _mark_stale_requeued(session, stale_before, batch_size, run_id):
        publish(ids)
        report.republished += len(ids)
        JOBS_REPUBLISHED.inc(len(ids))
        log.warning("re-published %d jobs whose messages were not picked up", len(ids))
    return report


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
    candidates = (
        select(Job.id)
        .join(Run, Run.id == Job.run_id)
        .where(Job.status == JobStatus.PENDING, Job.run_id.in_(run_ids))
        .order_by(Run.priority.desc(), Job.id)
        .limit(limit)
        .with_for_update(of=Job, skip_locked=True)
    )
    ids = list(session.scalars(candidates))
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.PENDING)
            .values(status=JobStatus.QUEUED, queued_at=utcnow())
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
        .order_by(Job.id)
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
    """Publish ids as render tasks over one pooled broker connection."""
    from worker.celery_app import RENDER_TASK

    def publish(ids: Iterable[int]) -> None:
        with app.producer_or_acquire() as producer:
            for job_id in ids:
                app.send_task(RENDER_TASK, args=[job_id], queue=queue, producer=producer)

    return publish
