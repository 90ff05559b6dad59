"""Finding the runs that finished rendering or whose review is complete, and recording their
events (db.webhooks.record_event), by query: the workers and the review app write nothing
for it, and detecting twice, or in two deliverers at once, records each event once.

- ``run.rendered``: the run is finished or cancelled and none of its jobs is pending, queued
  or running.
- ``run.reviewed``: the run is finished, none of its jobs is open, it has review items and
  all are submitted, every item with a done job has one (the review queue has caught up),
  and the last submission is older than the reopen window (a reviewer may still take an item
  back until then).

Each is recorded once per run: a run re-rolled after its events keeps them. Runs created
before ``since`` are not looked at, so that turning webhooks on does not announce every run
of the past.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.orm import Session

from db.models import (
    OPEN_JOB_STATUSES,
    Image,
    ImageReview,
    Job,
    JobStatus,
    ReviewItem,
    ReviewStatus,
    Run,
    RunStatus,
    SafetyStatus,
)
from db.webhooks import WebhookEvent, WebhookEventType, record_event


@dataclass
class Detected:
    rendered: list[int]
    reviewed: list[int]


def _no_event(event_type: WebhookEventType) -> ColumnElement[bool]:
    return ~exists().where(WebhookEvent.run_id == Run.id, WebhookEvent.type == event_type.value)


def _no_open_jobs() -> ColumnElement[bool]:
    return ~exists().where(Job.run_id == Run.id, Job.status.in_(OPEN_JOB_STATUSES))


def rendered_runs(session: Session, *, since: datetime) -> list[int]:
    """Runs created since ``since`` whose jobs have all ended and that have no
    ``run.rendered`` event yet."""
    query = select(Run.id).where(
        Run.created_at >= since,
        Run.status.in_((RunStatus.FINISHED, RunStatus.CANCELLED)),
        _no_open_jobs(),
        _no_event(WebhookEventType.RUN_RENDERED),
    )
    return list(session.scalars(query.order_by(Run.id)))


def reviewed_runs(session: Session, *, since: datetime, submitted_before: datetime) -> list[int]:
    """Runs created since ``since`` whose review is complete (see the module's docstring),
    last submitted before ``submitted_before``, that have no ``run.reviewed`` event yet."""
    of_run = ReviewItem.run_id == Run.id
    item_without_review = (
        exists()
        .where(Job.run_id == Run.id, Job.status == JobStatus.DONE)
        .where(~exists().where(ReviewItem.run_id == Job.run_id, ReviewItem.item_id == Job.item_id))
    )
    last_submitted = (
        select(func.max(ReviewItem.submitted_at)).where(of_run).correlate(Run).scalar_subquery()
    )
    query = select(Run.id).where(
        Run.created_at >= since,
        Run.status == RunStatus.FINISHED,
        _no_event(WebhookEventType.RUN_REVIEWED),
        exists().where(of_run),
        ~exists().where(of_run, ReviewItem.status != ReviewStatus.DONE),
        _no_open_jobs(),
        ~item_without_review,
        last_submitted < submitted_before,
    )
    return list(session.scalars(query.order_by(Run.id)))


def _counts(session: Session, column: Any, *where: ColumnElement[bool]) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).where(*where).group_by(column))
    return {str(value): int(count) for value, count in rows}


def _run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    assert run is not None  # found by the detection query in this transaction
    return run


def rendered_data(session: Session, run_id: int) -> dict[str, Any]:
    """What a ``run.rendered`` event says: the run's status and its jobs and images counted."""
    run = _run(session, run_id)
    jobs = _counts(session, Job.status, Job.run_id == run_id)
    images = _counts(session, Image.safety, Job.run_id == run_id, Image.job_id == Job.id)
    return {
        "status": run.status,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "jobs": {status.value: jobs.get(status.value, 0) for status in JobStatus},
        "images": sum(images.values()),
        "images_flagged": images.get(SafetyStatus.FLAGGED.value, 0),
    }


def reviewed_data(session: Session, run_id: int) -> dict[str, Any]:
    """What a ``run.reviewed`` event says: items submitted, images kept and rejected."""
    decisions = _counts(session, ImageReview.decision, ImageReview.run_id == run_id)
    items = session.scalar(
        select(func.count()).select_from(ReviewItem).where(ReviewItem.run_id == run_id)
    )
    last = session.scalar(
        select(func.max(ReviewItem.submitted_at)).where(ReviewItem.run_id == run_id)
    )
    return {
        "items": int(items or 0),
        "kept": decisions.get("keep", 0),
        "rejected": decisions.get("reject", 0),
        "last_submitted_at": last.isoformat() if last else None,
    }


def detect_transitions(
    session: Session, *, now: datetime, lookback: timedelta, reopen_window: timedelta
) -> Detected:
    """Record the events of the runs that finished rendering or were reviewed since they were
    last looked at. Commits. Returns the runs whose events were recorded now (by another
    deliverer at the same moment: left out)."""
    since = now - lookback
    detected = Detected(rendered=[], reviewed=[])
    for run_id in rendered_runs(session, since=since):
        data = rendered_data(session, run_id)
        if record_event(session, run_id, WebhookEventType.RUN_RENDERED, data, at=now):
            detected.rendered.append(run_id)
    for run_id in reviewed_runs(session, since=since, submitted_before=now - reopen_window):
        data = reviewed_data(session, run_id)
        if record_event(session, run_id, WebhookEventType.RUN_REVIEWED, data, at=now):
            detected.reviewed.append(run_id)
    session.commit()
    return detected
