"""Decisions on more than one image at once: a near-duplicate group, "keep the top N" and
"reject the rest". Each keeps what a person decided already and adds what is missing, and
the decisions of one action share a time stamp, so one undo walks them all back.

A decision on a group (closed, as the grid shows it: its best member) decides that member as
asked and rejects the group's other members that no one has decided, as duplicates of it;
members a person decided keep their decisions. Opened, a group's members are decided one by
one like any image.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Decision, Image, ImageReview, Job, ReviewItem, SafetyStatus, utcnow
from review.metrics import DECISIONS
from review.queue import (
    ReviewError,
    hold,
    image_of_item,
    record_decision,
    reject_undecided,
)
from review.ranked import RankedGrid, rank_grid

# The most images one batch may decide (a grid holds a few dozen).
MAX_BATCH = 1000


@dataclass(frozen=True)
class Wanted:
    """One decision asked for: on the image alone, or on its group (``group``)."""

    image_id: int
    decision: Decision
    group: bool = False


@dataclass(frozen=True)
class Changed:
    image_id: int
    decision: Decision


def item_grid(session: Session, item: ReviewItem, duplicate_similarity: float) -> RankedGrid:
    """The item's grid as a reviewer sees it by default (flagged images left out)."""
    rows = session.execute(
        select(Image.id, ImageReview.decision)
        .join(Job, Job.id == Image.job_id)
        .outerjoin(ImageReview, ImageReview.image_id == Image.id)
        .where(
            Job.run_id == item.run_id,
            Job.item_id == item.item_id,
            Image.safety != SafetyStatus.FLAGGED,
        )
        .order_by(Job.template, Job.variant, Job.id, Image.seed)
    ).all()
    return rank_grid(
        session,
        run_id=item.run_id,
        item_id=item.item_id,
        review_item_id=item.id,
        shown=[int(image_id) for image_id, _ in rows],
        decided={int(image_id) for image_id, decision in rows if decision is not None},
        duplicate_similarity=duplicate_similarity,
        cut=None,
    )


def _duplicates(grid: RankedGrid, image_id: int) -> list[int]:
    """The other members of the image's group, best first."""
    group = next((i.group for i in grid.images if i.scored.image_id == image_id), image_id)
    members = [i.scored.image_id for i in grid.images if i.group == group]
    return [member for member in members if member != image_id]


def _apply(
    session: Session,
    item: ReviewItem,
    wanted: list[Wanted],
    grid: RankedGrid | None,
    reviewer_id: int,
) -> list[Changed]:
    at = utcnow()
    changed: list[Changed] = []
    for want in wanted:
        image = image_of_item(session, item, want.image_id)
        record_decision(session, item, image, want.decision, reviewer_id=reviewer_id, at=at)
        changed.append(Changed(image.id, want.decision))
        if not want.group or grid is None:
            continue
        for duplicate in _duplicates(grid, image.id):
            if session.get(ImageReview, duplicate) is not None:
                continue  # a person decided it: that stands
            other = image_of_item(session, item, duplicate)
            record_decision(session, item, other, Decision.REJECT, reviewer_id=reviewer_id, at=at)
            changed.append(Changed(duplicate, Decision.REJECT))
    return changed


def _count(changed: list[Changed]) -> None:
    for decision in (Decision.KEEP, Decision.REJECT):
        number = sum(change.decision == decision for change in changed)
        if number:
            DECISIONS.labels(decision=decision.value).inc(number)


def decide_many(
    session: Session,
    review_item_id: int,
    wanted: list[Wanted],
    *,
    reviewer_id: int,
    lease: timedelta,
    duplicate_similarity: float,
) -> list[Changed]:
    """Record ``wanted`` on the item the reviewer holds, as one action; returns every image
    whose decision was set (a group's duplicates included). Commits."""
    if len(wanted) > MAX_BATCH:
        raise ReviewError(f"at most {MAX_BATCH} decisions at once")
    item = hold(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    grid = item_grid(session, item, duplicate_similarity) if any(w.group for w in wanted) else None
    try:
        changed = _apply(session, item, wanted, grid, reviewer_id)
    except ReviewError:
        session.rollback()
        raise
    session.commit()
    _count(changed)
    return changed


def keep_top(
    session: Session,
    review_item_id: int,
    count: int,
    *,
    reviewer_id: int,
    lease: timedelta,
    duplicate_similarity: float,
) -> list[Changed]:
    """Keep the ``count`` best undecided cards of the item's grid (each a closed group: its
    best member kept, its undecided duplicates rejected), as one action. Images the model
    rejected stay out of it. Commits."""
    item = hold(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    grid = item_grid(session, item, duplicate_similarity)
    leads = [
        image.scored.image_id
        for image in grid.images
        if image.lead and not image.auto_rejected and not image.decided
    ]
    wanted = [Wanted(image_id, Decision.KEEP, group=True) for image_id in leads[:count]]
    changed = _apply(session, item, wanted, grid, reviewer_id)
    session.commit()
    _count(changed)
    return changed


def reject_rest(
    session: Session, review_item_id: int, *, reviewer_id: int, lease: timedelta
) -> list[Changed]:
    """Reject every undecided image of the item the reviewer holds (not the flagged ones,
    nor the model's own rejections), as one action, without submitting it. Commits."""
    item = hold(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    rejected = reject_undecided(session, item, reviewer_id=reviewer_id)
    session.commit()
    changed = [Changed(image_id, Decision.REJECT) for image_id in rejected]
    _count(changed)
    return changed
