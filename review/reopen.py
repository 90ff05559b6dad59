"""Undo after Enter: a reviewer may reopen the item they submitted last, within
PIXELMILL_REVIEW_REOPEN_SECONDS. The item is theirs again, open, with the decisions it had
before the submit: the images the submit rejected for being undecided are undecided again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import (
    CatalogueItem,
    ImageReview,
    ReviewAction,
    ReviewEvent,
    ReviewItem,
    ReviewStatus,
    utcnow,
)
from review.clock import aware, seconds_until
from review.metrics import DECISIONS
from review.queue import ClaimError, NotFoundError


@dataclass
class Reopenable:
    review_item_id: int
    item_key: str
    seconds_left: int


def _last_submit(session: Session, reviewer_id: int) -> ReviewEvent | None:
    return session.scalar(
        select(ReviewEvent)
        .where(ReviewEvent.reviewer_id == reviewer_id, ReviewEvent.action == ReviewAction.SUBMIT)
        .order_by(ReviewEvent.id.desc())
        .limit(1)
    )


def reopenable(session: Session, reviewer_id: int, window: timedelta) -> Reopenable | None:
    """The reviewer's last submitted item while it may still be reopened, else None."""
    last = _last_submit(session, reviewer_id)
    if last is None or last.undone:
        return None
    seconds_left = seconds_until(aware(last.created_at) + window)
    if seconds_left <= 0:
        return None
    key = session.scalar(
        select(CatalogueItem.external_key)
        .join(ReviewItem, ReviewItem.item_id == CatalogueItem.id)
        .where(ReviewItem.id == last.review_item_id)
    )
    return Reopenable(last.review_item_id, key or "", seconds_left)


def reopen(
    session: Session,
    review_item_id: int,
    *,
    reviewer_id: int,
    lease: timedelta,
    window: timedelta,
) -> int:
    """Reopen the reviewer's last submitted item and hold it for them; returns how many
    images became undecided again. :class:`ClaimError` when it is not their last submit,
    the window has passed, or it was reopened already. Commits."""
    item = session.get(ReviewItem, review_item_id)
    if item is None:
        raise NotFoundError(f"review item {review_item_id} does not exist")
    last = _last_submit(session, reviewer_id)
    if last is None or last.review_item_id != review_item_id or last.undone:
        raise ClaimError("only the last item you submitted can be reopened")
    if aware(last.created_at) + window < utcnow():
        raise ClaimError(
            f"the {int(window.total_seconds())} s to reopen the item have passed: "
            "ask an admin to re-review it"
        )
    now = utcnow()
    # Conditional, so a double press (or two tabs) reopens once.
    result = session.execute(
        update(ReviewItem)
        .where(
            ReviewItem.id == review_item_id,
            ReviewItem.status == ReviewStatus.DONE,
            ReviewItem.submitted_by == reviewer_id,
        )
        .values(
            status=ReviewStatus.OPEN,
            claimed_by=reviewer_id,
            claim_expires_at=now + lease,
            submitted_by=None,
            submitted_at=None,
        )
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        raise ClaimError(f"review item {review_item_id} is not submitted by you")
    restored = _walk_back_submit_rejects(session, last)
    last.undone = True
    session.add(
        ReviewEvent(
            run_id=item.run_id,
            review_item_id=item.id,
            reviewer_id=reviewer_id,
            action=ReviewAction.UNDO,
            created_at=now,
        )
    )
    session.commit()
    DECISIONS.labels(decision="undo").inc()
    return restored


def _walk_back_submit_rejects(session: Session, submit_event: ReviewEvent) -> int:
    """Undo the rejections the submit made of undecided images: its own events, stamped
    with the submit's time (review.queue.reject_undecided)."""
    events = session.scalars(
        select(ReviewEvent).where(
            ReviewEvent.review_item_id == submit_event.review_item_id,
            ReviewEvent.reviewer_id == submit_event.reviewer_id,
            ReviewEvent.action == ReviewAction.REJECT,
            ReviewEvent.previous.is_(None),
            ReviewEvent.undone.is_(False),
            ReviewEvent.created_at == submit_event.created_at,
            ReviewEvent.id < submit_event.id,
        )
    ).all()
    for event in events:
        if event.image_id is not None:
            decision = session.get(ImageReview, event.image_id)
            if decision is not None:
                session.delete(decision)
        event.undone = True
    return len(events)
