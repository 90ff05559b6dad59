"""The outbox of webhook deliveries: one row per event and URL, claimed one at a time.

A deliverer claims the oldest due row by moving its ``next_attempt_at`` to the end of a lease
and counting the attempt, in one committed UPDATE, before it sends anything: on Postgres the
row is picked with ``FOR UPDATE SKIP LOCKED``, so deliverers claiming at the same moment take
different rows without waiting; the UPDATE's own condition (undelivered and due) is what
keeps SQLite, one writer at a time, correct. No transaction stays open while a receiver is
being waited for. A deliverer that dies mid-attempt leaves the row due again when the lease
ends: delivery is at least once, and receivers de-duplicate on the event id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import Run
from db.upsert import insert_ignoring_conflicts
from db.webhooks import WebhookDelivery, WebhookEvent


@dataclass(frozen=True)
class Claim:
    """A delivery claimed for one attempt, with what its body is made of."""

    delivery_id: int
    url: str
    attempt: int  # 1 for the first
    lease_until: datetime
    event_id: str
    event_type: str
    created_at: datetime
    run_id: int
    run_name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base`` seconds after the first failed attempt, doubling up to
    ``cap``; after ``max_attempts`` attempts a delivery is given up."""

    base_seconds: float
    cap_seconds: float
    max_attempts: int

    def delay(self, attempts: int) -> timedelta:
        exponent = min(max(attempts - 1, 0), 62)  # 2**62 s is past any cap
        return timedelta(seconds=min(self.cap_seconds, self.base_seconds * 2**exponent))


def fan_out(session: Session, urls: Sequence[str], *, now: datetime) -> int:
    """Give every event not yet fanned out a delivery row per URL, due now. Commits. Returns
    how many events were fanned out. An event recorded before a URL was configured is not
    sent to it later; with no URL, events wait for one."""
    if not urls:
        return 0
    events = list(
        session.scalars(
            select(WebhookEvent.id)
            .where(WebhookEvent.fanned_out_at.is_(None))
            .order_by(WebhookEvent.id)
            .with_for_update(skip_locked=True)
        )
    )
    if events:
        rows = [
            {"event_id": event, "url": url, "next_attempt_at": now, "created_at": now}
            for event in events
            for url in dict.fromkeys(urls)
        ]
        insert_ignoring_conflicts(session, WebhookDelivery, rows)
        session.execute(
            update(WebhookEvent).where(WebhookEvent.id.in_(events)).values(fanned_out_at=now)
        )
    session.commit()
    return len(events)


def claim_next(session: Session, *, now: datetime, lease: timedelta) -> Claim | None:
    """Claim the oldest due delivery for one attempt (see the module's docstring). Commits.
    None when nothing is due."""
    due = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    lease_until = now + lease
    claimed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == due,
            WebhookDelivery.delivered_at.is_(None),
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=lease_until)
        .returning(WebhookDelivery.id, WebhookDelivery.url, WebhookDelivery.attempts)
    ).first()
    session.commit()
    if claimed is None:
        return None
    delivery_id, url, attempt = claimed
    event, run_name = session.execute(
        select(WebhookEvent, Run.name)
        .join(WebhookDelivery, WebhookDelivery.event_id == WebhookEvent.id)
        .join(Run, Run.id == WebhookEvent.run_id)
        .where(WebhookDelivery.id == delivery_id)
    ).one()
    session.commit()
    return Claim(
        delivery_id=delivery_id,
        url=url,
        attempt=attempt,
        lease_until=lease_until,
        event_id=event.event_id,
        event_type=event.type,
        created_at=event.created_at,
        run_id=event.run_id,
        run_name=run_name,
        data=dict(event.data),
    )


def mark_delivered(session: Session, claim: Claim, *, status: int, now: datetime) -> None:
    """The receiver accepted the attempt. Commits."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claim.delivery_id)
        .values(delivered_at=now, last_status=status, last_error=None)
    )
    session.commit()


def mark_failed(
    session: Session,
    claim: Claim,
    *,
    status: int | None,
    error: str,
    now: datetime,
    backoff: Backoff,
) -> datetime | None:
    """The attempt failed: due again after the backoff, or given up (next_attempt_at None)
    after the last allowed attempt. Left alone if this claim's lease has ended and another
    deliverer has claimed the row since. Commits. Returns when it is due again."""
    retry_at = None if claim.attempt >= backoff.max_attempts else now + backoff.delay(claim.attempt)
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claim.delivery_id,
            WebhookDelivery.delivered_at.is_(None),
            WebhookDelivery.next_attempt_at == claim.lease_until,
        )
        .values(next_attempt_at=retry_at, last_status=status, last_error=error[:2000])
    )
    session.commit()
    return retry_at


def retry_given_up(session: Session, *, now: datetime) -> int:
    """Make every delivery that was given up due again, its attempts counted from zero.
    Commits. Returns how many."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.next_attempt_at.is_(None))
        .values(next_attempt_at=now, attempts=0)
    )
    session.commit()
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class OutboxRow:
    delivery_id: int
    event_id: str
    event_type: str
    run_name: str
    url: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None


def undelivered(session: Session, *, limit: int = 100) -> tuple[int, list[OutboxRow]]:
    """The deliveries not yet accepted (pending or given up), oldest first: how many in all,
    and the first ``limit``."""
    total = session.scalar(
        select(func.count())
        .select_from(WebhookDelivery)
        .where(WebhookDelivery.delivered_at.is_(None))
    )
    rows = session.execute(
        select(WebhookDelivery, WebhookEvent.event_id, WebhookEvent.type, Run.name)
        .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
        .join(Run, Run.id == WebhookEvent.run_id)
        .where(WebhookDelivery.delivered_at.is_(None))
        .order_by(WebhookDelivery.id)
        .limit(limit)
    ).all()
    listed = [
        OutboxRow(
            delivery_id=row.id,
            event_id=event_id,
            event_type=event_type,
            run_name=run_name,
            url=row.url,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            last_status=row.last_status,
            last_error=row.last_error,
        )
        for row, event_id, event_type, run_name in rows
    ]
    return int(total or 0), listed
