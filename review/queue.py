"""The review queue: which items are ready, who holds which, and every decision on them.

The unit of review is one catalogue item in one run (a ``review_items`` row). Rows are made by
:func:`sync_queue` once all the item's jobs in the run have ended. A reviewer claims the lowest
open row whose claim is free or expired; on Postgres the row is locked with ``FOR UPDATE SKIP
LOCKED``, so reviewers asking at the same moment get different rows without waiting on each
other. The claim itself is a conditional ``UPDATE`` (free or expired), which is also what keeps
SQLite (one writer at a time, no row locks) correct. An abandoned claim expires after the lease;
every decision renews it.

Every write here checks the claim and records an event (reviewer, action, time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    DateTime,
    and_,
    case,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from db.models import (
    OPEN_JOB_STATUSES,
    Decision,
    Image,
    ImageReview,
    Job,
    JobStatus,
    ReviewAction,
    Reviewer,
    ReviewEvent,
    ReviewItem,
    ReviewStatus,
    ReviewSync,
    Run,
    RunStatus,
    SafetyStatus,
    utcnow,
)
from db.ranking import AutoReject
from db.upsert import insert_ignoring_conflicts_stmt, upsert
from pixelmill.errors import PixelmillError
from review.metrics import DECISIONS


class ReviewError(PixelmillError):
    """A review action that cannot be done; ``status`` is the HTTP status that says why."""

    status = 400

    def details(self) -> dict[str, str]:
        """What the API adds to the message, for a client to act on."""
        return {}


class NotFoundError(ReviewError):
    status = 404


class ClaimError(ReviewError):
    """The item is held by someone else, or no longer open."""

    status = 409


class HeldByOtherError(ClaimError):
    """Someone else holds the item; ``taken_over``: the reviewer asking had worked on it, so
    it was taken over after their hold expired."""

    def __init__(self, message: str, *, holder: str, taken_over: bool) -> None:
        super().__init__(message)
        self.holder = holder
        self.taken_over = taken_over

    def details(self) -> dict[str, str]:
        return {"code": "taken_over" if self.taken_over else "held", "holder": self.holder}


# --- intake ----------------------------------------------------------------------------


@dataclass
class SyncReport:
    added: int = 0
    reopened: int = 0
    runs_scanned: int = 0


def sync_queue(session: Session, run_id: int | None = None) -> SyncReport:
    """Add a review row for every item whose jobs in the run have all ended with at least one
    job done, and reopen re-rolled items whose new jobs have ended. Commits.

    The scan over a run's jobs is skipped for a finished run already scanned since it finished
    (its ``finished_at`` unchanged): a finished run gets no new items except by re-roll, and
    re-rolling makes it active again.
    """
    report = SyncReport()
    runs = select(Run.id, Run.status, Run.finished_at).where(Run.status != RunStatus.CANCELLED)
    if run_id is not None:
        runs = runs.where(Run.id == run_id)
    synced = dict(session.execute(select(ReviewSync.run_id, ReviewSync.run_finished_at)).all())
    for rid, status, finished_at in session.execute(runs).all():
        report.reopened += _reopen_rerolled(session, rid)
        # Read before the scan: a run seen finished here had every job committed before it.
        if status == RunStatus.FINISHED and rid in synced and synced[rid] == finished_at:
            session.commit()
            continue
        report.added += _add_ready_items(session, rid)
        report.runs_scanned += 1
        _record_sync(session, rid, finished_at if status == RunStatus.FINISHED else None)
        session.commit()
    return report


def _add_ready_items(session: Session, run_id: int) -> int:
    open_jobs = func.sum(case((Job.status.in_(OPEN_JOB_STATUSES), 1), else_=0))
    done_jobs = func.sum(case((Job.status == JobStatus.DONE, 1), else_=0))
    ready = (
        select(Job.run_id, Job.item_id, literal(utcnow(), DateTime(timezone=True)))
        .where(
            Job.run_id == run_id,
            ~select(ReviewItem.id)
            .where(ReviewItem.run_id == Job.run_id, ReviewItem.item_id == Job.item_id)
            .exists(),
        )
        .group_by(Job.run_id, Job.item_id)
        .having(and_(open_jobs == 0, done_jobs > 0))
    )
    # ON CONFLICT DO NOTHING: two app processes may sync the same run at once.
    added = session.scalars(
        insert_ignoring_conflicts_stmt(session, ReviewItem)
        .from_select(["run_id", "item_id", "created_at"], ready)
        .returning(ReviewItem.id)
    ).all()
    return len(added)


def _reopen_rerolled(session: Session, run_id: int) -> int:
    still_rendering = (
        select(Job.id)
        .where(
            Job.run_id == ReviewItem.run_id,
            Job.item_id == ReviewItem.item_id,
            Job.status.in_(OPEN_JOB_STATUSES),
        )
        .exists()
    )
    result = session.execute(
        update(ReviewItem)
        .where(
            ReviewItem.run_id == run_id,
            ReviewItem.status == ReviewStatus.REROLLING,
            ~still_rendering,
        )
        .values(status=ReviewStatus.OPEN, claimed_by=None, claim_expires_at=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _record_sync(session: Session, run_id: int, finished_at: datetime | None) -> None:
    # An upsert: two app processes (or a sync thread and a reviewer's on-demand sync) may
    # record a new run's first sync at the same time.
    upsert(
        session,
        ReviewSync,
        {"run_id": run_id, "run_finished_at": finished_at, "synced_at": utcnow()},
        key=["run_id"],
    )


# --- claims ----------------------------------------------------------------------------


def _claim_free(now: datetime) -> ColumnElement[bool]:
    return or_(ReviewItem.claimed_by.is_(None), ReviewItem.claim_expires_at < now)


def _own_claim(
    session: Session, run_id: int, reviewer_id: int, now: datetime, other: ColumnElement[bool]
) -> int | None:
    return session.scalar(
        select(ReviewItem.id)
        .where(
            ReviewItem.claimed_by == reviewer_id,
            ReviewItem.run_id == run_id,
            ReviewItem.status == ReviewStatus.OPEN,
            ReviewItem.claim_expires_at >= now,
            other,
        )
        .order_by(ReviewItem.id)
        .limit(1)
    )


def claim_next(
    session: Session,
    *,
    run_id: int,
    reviewer_id: int,
    lease: timedelta,
    besides: int | None = None,
) -> int | None:
    """Claim the next open item of the run for the reviewer and return its review item id;
    the reviewer's own unexpired claim in the run comes back first. ``besides``: an item not
    to return (the one on screen, when the page fetches the next ahead of time). None:
    nothing to review now. Commits."""
    now = utcnow()
    other = ReviewItem.id != besides if besides is not None else true()
    held = _own_claim(session, run_id, reviewer_id, now, other)
    if held is not None:
        _renew(session, held, reviewer_id, now + lease)
        session.commit()
        return held
    # On SQLite FOR UPDATE is not emitted and a concurrent writer can win the row between the
    # SELECT and the UPDATE: the conditional UPDATE then changes nothing and we look again.
    for _attempt in range(20):
        candidate = session.scalar(
            select(ReviewItem.id)
            .where(
                ReviewItem.run_id == run_id,
                ReviewItem.status == ReviewStatus.OPEN,
                _claim_free(now),
                other,
            )
            .order_by(ReviewItem.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if candidate is None:
            session.commit()
            return None
        result = session.execute(
            update(ReviewItem)
            .where(
                ReviewItem.id == candidate,
                ReviewItem.status == ReviewStatus.OPEN,
                _claim_free(now),
            )
            .values(claimed_by=reviewer_id, claim_expires_at=now + lease)
        )
        session.commit()
        if result.rowcount:  # type: ignore[attr-defined]
            return candidate
    return None


def _renew(session: Session, review_item_id: int, reviewer_id: int, expires: datetime) -> None:
    session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == review_item_id, ReviewItem.claimed_by == reviewer_id)
        .values(claim_expires_at=expires)
    )


def hold(
    session: Session, review_item_id: int, *, reviewer_id: int, lease: timedelta
) -> ReviewItem:
    """Make sure the reviewer holds the open item (taking it over if its claim expired) and
    renew the lease; raises :class:`ClaimError` if someone else holds it or it is not open.
    On Postgres the row stays locked until the caller commits."""
    now = utcnow()
    result = session.execute(
        update(ReviewItem)
        .where(
            ReviewItem.id == review_item_id,
            ReviewItem.status == ReviewStatus.OPEN,
            or_(ReviewItem.claimed_by == reviewer_id, _claim_free(now)),
        )
        .values(claimed_by=reviewer_id, claim_expires_at=now + lease)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        refusal = _refusal(session, review_item_id, reviewer_id)
        session.rollback()
        raise refusal
    item = session.get(ReviewItem, review_item_id)
    assert item is not None
    session.refresh(item)
    return item


def _refusal(session: Session, review_item_id: int, reviewer_id: int) -> ReviewError:
    """Why the reviewer cannot hold the item, said so that they know what happened."""
    row = session.execute(
        select(ReviewItem.status, Reviewer.name)
        .outerjoin(Reviewer, Reviewer.id == ReviewItem.claimed_by)
        .where(ReviewItem.id == review_item_id)
    ).one_or_none()
    if row is None:
        return NotFoundError(f"review item {review_item_id} does not exist")
    status, holder = row
    if status != ReviewStatus.OPEN:
        return ClaimError(f"review item {review_item_id} is {status}, not open")
    worked_on = session.scalar(
        select(ReviewEvent.id)
        .where(ReviewEvent.review_item_id == review_item_id, ReviewEvent.reviewer_id == reviewer_id)
        .limit(1)
    )
    if worked_on is not None:
        return HeldByOtherError(
            f"Another reviewer, {holder}, took this item over after your hold on it expired: "
            "this change was not saved (your decisions before it expired were). "
            "Take the next item.",
            holder=str(holder),
            taken_over=True,
        )
    return HeldByOtherError(
        f"review item {review_item_id} is claimed by another reviewer ({holder})",
        holder=str(holder),
        taken_over=False,
    )


def release(session: Session, review_item_id: int, *, reviewer_id: int) -> None:
    """Give a claim back (the reviewer skipped the item); :class:`ClaimError` if the reviewer
    does not hold it (an expired hold is still theirs until someone takes it). Commits."""
    result = session.execute(
        update(ReviewItem)
        .where(
            ReviewItem.id == review_item_id,
            ReviewItem.claimed_by == reviewer_id,
            ReviewItem.status == ReviewStatus.OPEN,
        )
        .values(claimed_by=None, claim_expires_at=None)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        status = session.scalar(select(ReviewItem.status).where(ReviewItem.id == review_item_id))
        session.rollback()
        if status is None:
            raise NotFoundError(f"review item {review_item_id} does not exist")
        raise ClaimError(f"you do not hold review item {review_item_id}: nothing to release")
    session.commit()


# --- decisions -------------------------------------------------------------------------


def image_of_item(session: Session, item: ReviewItem, image_id: int) -> Image:
    image = session.scalar(
        select(Image)
        .join(Job, Job.id == Image.job_id)
        .where(Image.id == image_id, Job.run_id == item.run_id, Job.item_id == item.item_id)
    )
    if image is None:
        raise NotFoundError(f"image {image_id} is not one of review item {item.id}'s images")
    return image


def _set_decision(
    session: Session, item: ReviewItem, image_id: int, decision: str | None, reviewer_id: int
) -> None:
    current = session.get(ImageReview, image_id)
    if decision is None:
        if current is not None:
            session.delete(current)
        return
    if current is None:
        session.add(
            ImageReview(
                image_id=image_id,
                run_id=item.run_id,
                review_item_id=item.id,
                decision=decision,
                reviewer_id=reviewer_id,
                decided_at=utcnow(),
            )
        )
    else:
        current.decision = decision
        current.reviewer_id = reviewer_id
        current.decided_at = utcnow()


def record_decision(
    session: Session,
    item: ReviewItem,
    image: Image,
    decision: Decision,
    *,
    reviewer_id: int,
    at: datetime | None = None,
) -> None:
    """Keep or reject one image of ``item`` and log it, stamped ``at`` (default now): the
    decisions of one action (a group, "keep the top N") share a stamp, which is how undo
    walks them back together. The caller holds the item and commits."""
    if decision == Decision.KEEP and not image.storage_key:
        # Flagged with PIXELMILL_FLAGGED_IMAGES=drop: there is no file to keep or export.
        raise ReviewError(f"image {image.id} was flagged and not stored: there is nothing to keep")
    current = session.get(ImageReview, image.id)
    previous = current.decision if current is not None else None
    _set_decision(session, item, image.id, decision.value, reviewer_id)
    session.add(
        ReviewEvent(
            run_id=item.run_id,
            review_item_id=item.id,
            image_id=image.id,
            reviewer_id=reviewer_id,
            action=ReviewAction(decision.value),
            previous=previous,
            created_at=at or utcnow(),
        )
    )
    session.flush()


def decide(
    session: Session,
    review_item_id: int,
    image_id: int,
    decision: Decision,
    *,
    reviewer_id: int,
    lease: timedelta,
) -> None:
    """Record keep or reject on one image of the item the reviewer holds. Commits."""
    item = hold(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    image = image_of_item(session, item, image_id)
    record_decision(session, item, image, decision, reviewer_id=reviewer_id)
    session.commit()
    DECISIONS.labels(decision=decision.value).inc()


def undo(
    session: Session, review_item_id: int, *, reviewer_id: int, lease: timedelta
) -> int | None:
    """:func:`undo_last`, for one image: the first image walked back, None when nothing was."""
    undone = undo_last(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    return undone[0] if undone else None


def undo_last(
    session: Session, review_item_id: int, *, reviewer_id: int, lease: timedelta
) -> list[int]:
    """Walk back the item's latest keep/reject not yet undone, with the others of the same
    action (the same reviewer's, stamped the same): each image gets the decision it had
    before (or none). Returns those images' ids in the order they were decided, none when
    there is nothing to undo. Commits."""
    item = hold(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    decisions = [ReviewAction.KEEP, ReviewAction.REJECT]
    last = session.scalar(
        select(ReviewEvent)
        .where(
            ReviewEvent.review_item_id == item.id,
            ReviewEvent.action.in_(decisions),
            ReviewEvent.undone.is_(False),
        )
        .order_by(ReviewEvent.id.desc())
        .limit(1)
    )
    if last is None or last.image_id is None:
        session.commit()
        return []
    batch = session.scalars(
        select(ReviewEvent)
        .where(
            ReviewEvent.review_item_id == item.id,
            ReviewEvent.action.in_(decisions),
            ReviewEvent.undone.is_(False),
            ReviewEvent.reviewer_id == last.reviewer_id,
            ReviewEvent.created_at == last.created_at,
        )
        .order_by(ReviewEvent.id.desc())
    ).all()
    undone: list[int] = []
    for event in batch:
        if event.image_id is None:
            continue
        _set_decision(session, item, event.image_id, event.previous, reviewer_id)
        session.flush()
        event.undone = True
        undone.append(event.image_id)
        session.add(
            ReviewEvent(
                run_id=item.run_id,
                review_item_id=item.id,
                image_id=event.image_id,
                reviewer_id=reviewer_id,
                action=ReviewAction.UNDO,
            )
        )
    session.commit()
    DECISIONS.labels(decision="undo").inc(len(undone))
    return undone[::-1]


def reject_undecided(
    session: Session, item: ReviewItem, *, reviewer_id: int, at: datetime | None = None
) -> list[int]:
    """Reject every visible image of the item that has no decision yet (the reviewer picked
    the keepers and moved on). Flagged images stay undecided: nobody looked at them; so do
    the keeper model's own rejections in force, which stay the model's (the grid hides them)
    and are not made a person's. Their
    events are stamped ``at`` (default now): a submit stamps its own event the same, which
    is how reopening it finds them. Returns the ids of those rejected; the caller commits."""
    undecided = list(
        session.scalars(
            select(Image.id)
            .join(Job, Job.id == Image.job_id)
            .where(
                Job.run_id == item.run_id,
                Job.item_id == item.item_id,
                Image.safety != SafetyStatus.FLAGGED,
                ~select(ImageReview.image_id).where(ImageReview.image_id == Image.id).exists(),
                ~select(AutoReject.image_id)
                .where(AutoReject.image_id == Image.id, AutoReject.undone_at.is_(None))
                .exists(),
            )
            .order_by(Image.id)
        )
    )
    now = at or utcnow()
    for image_id in undecided:
        _set_decision(session, item, image_id, Decision.REJECT.value, reviewer_id)
        session.add(
            ReviewEvent(
                run_id=item.run_id,
                review_item_id=item.id,
                image_id=image_id,
                reviewer_id=reviewer_id,
                action=ReviewAction.REJECT,
                created_at=now,
            )
        )
    return undecided


def submit(session: Session, review_item_id: int, *, reviewer_id: int, lease: timedelta) -> int:
    """Finish the item: undecided visible images are rejected (see :func:`reject_undecided`),
    the item is done and its claim released. Returns how many were rejected that way.
    Commits."""
    item = hold(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    now = utcnow()
    rejected = len(reject_undecided(session, item, reviewer_id=reviewer_id, at=now))
    item.status = ReviewStatus.DONE
    item.claimed_by = None
    item.claim_expires_at = None
    item.submitted_by = reviewer_id
    item.submitted_at = now
    session.add(
        ReviewEvent(
            run_id=item.run_id,
            review_item_id=item.id,
            reviewer_id=reviewer_id,
            action=ReviewAction.SUBMIT,
            created_at=now,
        )
    )
    session.commit()
    if rejected:
        DECISIONS.labels(decision=Decision.REJECT.value).inc(rejected)
    return rejected
