"""The queue on Postgres: intake, claims and leases, decisions, undo, submit."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import (
    Decision,
    Image,
    ImageReview,
    Job,
    JobStatus,
    Reviewer,
    ReviewEvent,
    ReviewItem,
    ReviewStatus,
    Run,
    RunStatus,
    utcnow,
)
from review.queue import (
    ClaimError,
    ReviewError,
    claim_next,
    decide,
    hold,
    submit,
    sync_queue,
    undo,
)
from tests.factories import add_images
from tests.review.factory import make_run

LEASE = timedelta(minutes=10)


def test_items_enter_the_queue_once_all_their_jobs_ended(session: Session) -> None:
    made = make_run(session, items=3, run_status=RunStatus.ACTIVE)
    # Item 0 still has a job rendering; item 2's jobs all failed (nothing to review).
    first_job = next(job for job in made.jobs if job.item_id == made.items[0].id)
    first_job.status = JobStatus.RUNNING
    for job in made.jobs:
        if job.item_id == made.items[2].id:
            session.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.FAILED))
    session.commit()

    report = sync_queue(session)
    assert report.added == 1
    queued = session.scalars(select(ReviewItem.item_id)).all()
    assert queued == [made.items[1].id]

    first_job.status = JobStatus.DONE
    session.commit()
    assert sync_queue(session).added == 1
    assert sync_queue(session).added == 0  # idempotent
    assert session.scalar(select(func.count()).select_from(ReviewItem)) == 2


def test_a_finished_run_is_scanned_once(session: Session) -> None:
    make_run(session, items=2)
    assert sync_queue(session).runs_scanned == 1
    assert sync_queue(session).runs_scanned == 0
    # Finishing again (after a re-roll, say) changes finished_at: scanned again.
    session.execute(update(Run).values(finished_at=utcnow()))
    session.commit()
    assert sync_queue(session).runs_scanned == 1


def test_two_reviewers_get_different_items_and_keep_their_own(
    session: Session, alice: Reviewer, bob: Reviewer
) -> None:
    made = make_run(session, items=3)
    sync_queue(session)
    run_id = made.run.id
    first = claim_next(session, run_id=run_id, reviewer_id=alice.id, lease=LEASE)
    second = claim_next(session, run_id=run_id, reviewer_id=bob.id, lease=LEASE)
    assert first is not None and second is not None and first != second
    # Asking again (a page reload) gives each their own item back.
    assert claim_next(session, run_id=run_id, reviewer_id=alice.id, lease=LEASE) == first
    assert claim_next(session, run_id=run_id, reviewer_id=bob.id, lease=LEASE) == second


def test_an_expired_claim_is_offered_again(
    session: Session, alice: Reviewer, bob: Reviewer
) -> None:
    made = make_run(session, items=1)
    sync_queue(session)
    run_id = made.run.id
    taken = claim_next(session, run_id=run_id, reviewer_id=alice.id, lease=LEASE)
    assert taken is not None
    assert claim_next(session, run_id=run_id, reviewer_id=bob.id, lease=LEASE) is None
    # Alice walked away: her lease runs out.
    session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == taken)
        .values(claim_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    assert claim_next(session, run_id=run_id, reviewer_id=bob.id, lease=LEASE) == taken
    item = session.get(ReviewItem, taken)
    assert item is not None
    session.refresh(item)
    assert item.claimed_by == bob.id
    # Alice's late decision is refused: the item is Bob's now.
    image = made.images_of(made.items[0])[0]
    with pytest.raises(ClaimError, match="claimed by another reviewer"):
        decide(session, taken, image.id, Decision.KEEP, reviewer_id=alice.id, lease=LEASE)


def test_decisions_undo_and_submit_are_recorded(session: Session, alice: Reviewer) -> None:
    made = make_run(session, items=1, seeds=2)  # 2 templates x 2 seeds
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    a, b, c, d = (image.id for image in made.images)

    decide(session, item_id, a, Decision.KEEP, reviewer_id=alice.id, lease=LEASE)
    decide(session, item_id, b, Decision.KEEP, reviewer_id=alice.id, lease=LEASE)
    decide(session, item_id, b, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)
    assert undo(session, item_id, reviewer_id=alice.id, lease=LEASE) == b  # back to keep
    assert session.get(ImageReview, b).decision == "keep"  # type: ignore[union-attr]
    assert undo(session, item_id, reviewer_id=alice.id, lease=LEASE) == b  # back to none
    assert session.get(ImageReview, b) is None
    decide(session, item_id, c, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)

    assert submit(session, item_id, reviewer_id=alice.id, lease=LEASE) == 2  # b and d
    decisions = dict(session.execute(select(ImageReview.image_id, ImageReview.decision)).all())
    assert decisions == {a: "keep", b: "reject", c: "reject", d: "reject"}
    item = session.get(ReviewItem, item_id)
    assert item is not None
    session.refresh(item)
    assert (item.status, item.claimed_by, item.submitted_by) == ("done", None, alice.id)
    actions = session.scalars(select(ReviewEvent.action).order_by(ReviewEvent.id)).all()
    assert actions == [
        "keep", "keep", "reject", "undo", "undo", "reject", "reject", "reject", "submit"
    ]  # fmt: skip
    assert all(
        reviewer == alice.id for reviewer in session.scalars(select(ReviewEvent.reviewer_id))
    )
    # A submitted item takes no more decisions and is not offered again.
    with pytest.raises(ClaimError, match="is done"):
        decide(session, item_id, a, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)
    assert claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE) is None


def test_an_image_of_another_item_is_refused(session: Session, alice: Reviewer) -> None:
    made = make_run(session, items=2)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    item = session.get(ReviewItem, item_id)
    assert item is not None
    other = next(i for i in made.items if i.id != item.item_id)
    stranger = made.images_of(other)[0]
    with pytest.raises(Exception, match="not one of review item"):
        decide(session, item.id, stranger.id, Decision.KEEP, reviewer_id=alice.id, lease=LEASE)


def test_flagged_images_are_not_rejected_by_submit(session: Session, alice: Reviewer) -> None:
    made = make_run(session, items=1, seeds=2, templates=("studio",), flagged_seeds=1)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    assert submit(session, item_id, reviewer_id=alice.id, lease=LEASE) == 1
    assert session.scalar(select(func.count()).select_from(ImageReview)) == 1


def test_a_flagged_image_that_was_not_stored_cannot_be_kept(
    session: Session, alice: Reviewer
) -> None:
    made = make_run(session, items=1, seeds=2, templates=("studio",), flagged_seeds=1)
    dropped = made.images[0]  # PIXELMILL_FLAGGED_IMAGES=drop: no object behind the row
    session.execute(update(Image).where(Image.id == dropped.id).values(storage_key=""))
    session.commit()
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None

    with pytest.raises(ReviewError, match="flagged and not stored: there is nothing to keep"):
        decide(session, item_id, dropped.id, Decision.KEEP, reviewer_id=alice.id, lease=LEASE)
    session.rollback()
    decide(session, item_id, dropped.id, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)
    assert session.get(ImageReview, dropped.id).decision == Decision.REJECT  # type: ignore[union-attr]


def test_hold_takes_over_an_expired_claim(session: Session, alice: Reviewer, bob: Reviewer) -> None:
    made = make_run(session, items=1)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    with pytest.raises(ClaimError):
        hold(session, item_id, reviewer_id=bob.id, lease=LEASE)
    session.execute(update(ReviewItem).values(claim_expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    assert hold(session, item_id, reviewer_id=bob.id, lease=LEASE).claimed_by == bob.id
    session.commit()


def test_new_images_of_a_done_job_do_not_duplicate_items(session: Session) -> None:
    made = make_run(session, items=1, job_status=JobStatus.RUNNING, run_status=RunStatus.ACTIVE)
    assert sync_queue(session).added == 0
    for job in made.jobs:
        job.status = JobStatus.DONE
        add_images(session, job, None)
    session.commit()
    assert sync_queue(session).added == 1
    assert session.scalar(select(ReviewItem.status)) == ReviewStatus.OPEN
