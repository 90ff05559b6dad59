"""Webhook events and their deliveries: an outbox that the deliverer
(``pixelmill webhooks deliver``) sends from.

An event is recorded once, in the same database as what it tells about, and never changes:
its ``event_id`` is what every delivery of it carries, so a receiver can drop the ones it has
seen. A run's "rendered" and "reviewed" events are unique on (run, type), so recording them
again, from any number of deliverers, records nothing; every export written is an event of
its own. Each event gets one delivery row per configured URL, retried with backoff until the
receiver answers 2xx: nothing is lost while a receiver is down.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import Base, JSONType, utcnow
from db.upsert import insert_ignoring_conflicts_stmt


class WebhookEventType(enum.StrEnum):
    # Every job of the run has ended (done, failed, dead, blocked or cancelled).
    RUN_RENDERED = "run.rendered"
    # Every review item of the run with images has been submitted, and none is rendering.
    RUN_REVIEWED = "run.reviewed"
    # A sales-channel export wrote its files and manifest.
    EXPORT_WRITTEN = "export.written"


class WebhookEvent(Base):
    """Something that happened to a run, to be told to every configured URL."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        # "" for the run events (one per run and type); the export's own id for an export.
        UniqueConstraint("run_id", "type", "key"),
        CheckConstraint(
            "type IN (" + ", ".join(repr(t.value) for t in WebhookEventType) + ")", name="type"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # What receivers de-duplicate on: the same on every delivery and retry of the event.
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # The event's "data" object (counts, the manifest's location), as it was when recorded.
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When its delivery rows were made for the URLs configured then (None: not yet).
    fanned_out_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event to one URL: attempted until the receiver answers 2xx."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "url"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        # The deliverer's scan: undelivered rows by when they are due.
        Index(None, "delivered_at", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2000))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Not attempted before this. While an attempt is in flight it is the attempt's lease (a
    # deliverer that dies mid-attempt leaves the row due again); None: given up after the
    # last allowed attempt (`pixelmill webhooks retry` schedules it again).
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def record_event(
    session: Session,
    run_id: int,
    event_type: WebhookEventType,
    data: dict[str, Any],
    *,
    key: str = "",
    at: datetime | None = None,
) -> str | None:
    """Record an event for delivery, unless the run already has one of this type and key.
    Returns the new event's id, or None when it was there already. Does not commit.

    One statement (INSERT ... ON CONFLICT DO NOTHING), so deliverers recording the same
    transition at the same moment record it once."""
    event_id = str(uuid.uuid4())
    values = {
        "event_id": event_id,
        "type": event_type.value,
        "run_id": run_id,
        "key": key,
        "data": data,
        "created_at": at or utcnow(),
    }
    statement = insert_ignoring_conflicts_stmt(session, WebhookEvent).values(values)
    inserted = session.execute(statement.returning(WebhookEvent.id)).scalar_one_or_none()
    return event_id if inserted is not None else None


def record_export_written(session: Session, run_id: int, data: dict[str, Any]) -> str:
    """Record that an export of the run was written (``data``: its location, manifests and
    counts): every export is an event of its own. Returns its event id. Does not commit."""
    export_key = uuid.uuid4().hex
    event_id = record_event(session, run_id, WebhookEventType.EXPORT_WRITTEN, data, key=export_key)
    assert event_id is not None  # a new key never conflicts
    return event_id


def recorded_types(session: Session, run_id: int) -> set[str]:
    """The types of the run's recorded events."""
    return set(session.scalars(select(WebhookEvent.type).where(WebhookEvent.run_id == run_id)))
