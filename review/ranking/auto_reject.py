"""Rejections made by the keeper model on its own (PIXELMILL_AUTO_REJECT_BELOW, off by default).

They are made off the request path: by the queue's background sync once items are in the
queue, and after each retraining has refreshed the predictions. Only an open item's images
that no person has decided, that are not flagged, and whose calibrated keep probability is
below the threshold get one; an image gets at most one in its life, so an image a person
restored is never rejected again by a later model. The row is the model's decision, never a
person's (``image_reviews`` stays untouched): the grid hides it unless asked, a person undoes
it (``undone_by``) or overrides it with a decision of their own, stats count it apart, and the
export, which reads people's keeps only, never includes it. Nothing is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, DateTime, case, func, literal, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.models import (
    Decision,
    Image,
    ImageReview,
    Job,
    ReviewItem,
    ReviewStatus,
    SafetyStatus,
    utcnow,
)
from db.ranking import AutoReject, KeeperModel, KeeperPrediction
from db.upsert import insert_ignoring_conflicts_stmt


def _person_decided(image_id: InstrumentedAttribute[int]) -> ColumnElement[bool]:
    return select(ImageReview.image_id).where(ImageReview.image_id == image_id).exists()


def standing() -> ColumnElement[bool]:
    """An automatic rejection in force: not undone, and no person has decided the image."""
    return AutoReject.undone_at.is_(None) & ~_person_decided(AutoReject.image_id)


def make_auto_rejects(session: Session, threshold: float, *, run_id: int | None = None) -> int:
    """Reject (as the model) every undecided, unflagged image of an open item predicted below
    ``threshold``; returns how many. Uncommitted."""
    candidates = (
        select(
            Image.id,
            ReviewItem.run_id,
            ReviewItem.id,
            KeeperPrediction.model_id,
            KeeperPrediction.probability,
            literal(threshold),
            literal(utcnow(), DateTime(timezone=True)),
        )
        .join(Job, Job.id == Image.job_id)
        .join(ReviewItem, (ReviewItem.run_id == Job.run_id) & (ReviewItem.item_id == Job.item_id))
        .join(KeeperPrediction, KeeperPrediction.image_id == Image.id)
        .where(
            ReviewItem.status == ReviewStatus.OPEN,
            KeeperPrediction.probability < threshold,
            Image.safety != SafetyStatus.FLAGGED,
            ~_person_decided(Image.id),
            ~select(AutoReject.image_id).where(AutoReject.image_id == Image.id).exists(),
        )
    )
    if run_id is not None:
        candidates = candidates.where(ReviewItem.run_id == run_id)
    # ON CONFLICT DO NOTHING: the sync thread and a retraining may pass at the same moment.
    made = session.scalars(
        insert_ignoring_conflicts_stmt(session, AutoReject)
        .from_select(
            [
                "image_id",
                "run_id",
                "review_item_id",
                "model_id",
                "probability",
                "threshold",
                "created_at",
            ],
            candidates,
        )
        .returning(AutoReject.image_id)
    ).all()
    return len(made)


@dataclass(frozen=True)
class AutoRejected:
    """One image's automatic rejection, as the grid and the audit show it."""

    image_id: int
    probability: float
    threshold: float
    model_version: int
    undone: bool


def item_auto_rejects(session: Session, review_item_id: int) -> dict[int, AutoRejected]:
    """The item's automatic rejections (undone ones too), by image id."""
    rows = session.execute(
        select(AutoReject, KeeperModel.version)
        .join(KeeperModel, KeeperModel.id == AutoReject.model_id)
        .where(AutoReject.review_item_id == review_item_id)
    )
    return {
        row.image_id: AutoRejected(
            image_id=row.image_id,
            probability=row.probability,
            threshold=row.threshold,
            model_version=int(version),
            undone=row.undone_at is not None,
        )
        for row, version in rows
    }


def undo_auto_reject(session: Session, image_id: int, *, reviewer_id: int) -> bool:
    """A person undoes the model's rejection of the image: it is undecided again. False when
    there was none in force (never made, or undone already). Uncommitted."""
    result = session.execute(
        update(AutoReject)
        .where(AutoReject.image_id == image_id, AutoReject.undone_at.is_(None))
        .values(undone_by=reviewer_id, undone_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AutoRejectCounts:
    """A run's automatic rejections, apart from people's decisions: ``standing`` are still in
    force; the others were overturned by a person (``kept``, or ``undone`` back to undecided)
    or ``confirmed`` by a person's own reject."""

    made: int = 0
    standing: int = 0
    undone: int = 0
    kept: int = 0
    confirmed: int = 0


def auto_reject_counts(session: Session, run_id: int) -> AutoRejectCounts:
    """What became of the run's automatic rejections (for the stats page)."""

    def total(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    decided = ImageReview.decision.is_not(None)
    row = session.execute(
        select(
            func.count(AutoReject.image_id),
            total(~decided & AutoReject.undone_at.is_(None)),
            total(~decided & AutoReject.undone_at.is_not(None)),
            total(ImageReview.decision == Decision.KEEP),
            total(ImageReview.decision == Decision.REJECT),
        )
        .select_from(AutoReject)
        .outerjoin(ImageReview, ImageReview.image_id == AutoReject.image_id)
        .where(AutoReject.run_id == run_id)
    ).one()
    made, in_force, undone, kept, confirmed = (int(value or 0) for value in row)
    return AutoRejectCounts(made, in_force, undone, kept, confirmed)


def audit_sample(session: Session, run_id: int, size: int) -> list[AutoReject]:
    """A random sample of the run's automatic rejections still in force, for a person to
    confirm or undo (each look draws a new one)."""
    statement = (
        select(AutoReject)
        .where(AutoReject.run_id == run_id, standing())
        .order_by(func.random())
        .limit(size)
    )
    return list(session.scalars(statement))
