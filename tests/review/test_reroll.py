""" "None of these": new jobs with fresh seeds, published by the dispatcher like any other, and
the item back in the queue once they have rendered."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from db.models import (
    Decision,
    ImageReview,
    InputImage,
    Job,
    JobStatus,
    Reviewer,
    ReviewItem,
    ReviewStatus,
    Run,
    RunStatus,
)
from pixelmill.storage import Storage
from producer.dispatch import dispatch
from producer.runs import cancel_run
from review.images import ImageUrls
from review.queue import ReviewError, claim_next, decide, sync_queue
from review.reroll import reroll
from review.views import item_view
from tests.factories import add_images, make_job
from tests.races import race
from tests.review.factory import make_run
from worker.claim import ClaimedJob, claim_job, finish_job

LEASE = timedelta(minutes=10)


def test_reroll_queues_fresh_seeds_and_the_item_comes_back(
    session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=2, templates=("studio", "outdoor"), seeds=3)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    review_item = session.get(ReviewItem, item_id)
    assert review_item is not None
    old_jobs = [job for job in made.jobs if job.item_id == review_item.item_id]
    first_image = made.images_of(made.items[0])[0]
    decide(session, item_id, first_image.id, Decision.REJECT, reviewer_id=alice.id, lease=LEASE)

    new_ids = reroll(session, item_id, reviewer_id=alice.id, lease=LEASE)

    assert len(new_ids) == 2  # one per template
    new_jobs = list(session.scalars(select(Job).where(Job.id.in_(new_ids)).order_by(Job.id)))
    for new, old in zip(new_jobs, old_jobs, strict=True):
        assert new.status == JobStatus.PENDING
        assert (new.run_id, new.item_id, new.template, new.prompt, new.model) == (
            old.run_id,
            old.item_id,
            old.template,
            old.prompt,
            old.model,
        )
        assert len(new.seeds) == 3 and not set(new.seeds) & set(old.seeds)
        assert new.dedupe_key != old.dedupe_key
    # Every undecided image of the item was rejected; the item waits; the run is active again.
    decisions = session.scalars(
        select(ImageReview.decision).where(ImageReview.review_item_id == item_id)
    ).all()
    assert decisions == ["reject"] * 6
    session.refresh(review_item)
    assert (review_item.status, review_item.rerolls, review_item.claimed_by) == (
        ReviewStatus.REROLLING,
        1,
        None,
    )
    run = session.get(Run, made.run.id)
    assert run is not None
    session.refresh(run)
    assert run.status == RunStatus.ACTIVE and run.finished_at is None

    # The dispatcher publishes them through its normal path.
    published: list[int] = []

    def publish(ids: Iterable[int]) -> None:
        published.extend(ids)

    dispatch(session, publish, requeue_after=timedelta(minutes=15))
    assert sorted(published) == sorted(new_ids)

    # Not offered while its seeds render...
    sync_queue(session)
    other = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert other is not None and other != item_id
    session.execute(
        update(ReviewItem)
        .where(ReviewItem.id == other)
        .values(status="done", claimed_by=None, claim_expires_at=None)
    )
    session.commit()
    assert sync_queue(session).reopened == 0
    # ...and back once they have rendered, with the new images undecided.
    for job in new_jobs:
        job.status = JobStatus.DONE
        add_images(session, job, None)
    session.commit()
    assert sync_queue(session).reopened == 1
    assert claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE) == item_id
    view = item_view(session, item_id, ImageUrls(storage, expires_in=60))
    assert len(view.images) == 12
    assert sum(image.decision is None for image in view.images) == 6


def test_a_second_reroll_takes_the_next_seeds(session: Session, alice: Reviewer) -> None:
    made = make_run(session, items=1, templates=("studio",), seeds=2)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    first = reroll(session, item_id, reviewer_id=alice.id, lease=LEASE)
    for job in session.scalars(select(Job).where(Job.id.in_(first))):
        job.status = JobStatus.DONE
        add_images(session, job, None)
    session.commit()
    sync_queue(session)
    assert claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE) == item_id
    second = reroll(session, item_id, reviewer_id=alice.id, lease=LEASE)
    seeds = [set(job.seeds) for job in session.scalars(select(Job).order_by(Job.id))]
    assert len(seeds) == 3 and not (
        seeds[0] & seeds[1] or seeds[1] & seeds[2] or seeds[0] & seeds[2]
    )
    assert second != first


def test_reroll_is_refused_for_a_cancelled_run(session: Session, alice: Reviewer) -> None:
    made = make_run(session, items=1)
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None
    made.run.status = RunStatus.CANCELLED
    session.commit()
    jobs_before = len(session.scalars(select(Job.id)).all())
    with pytest.raises(ReviewError, match="was cancelled"):
        reroll(session, item_id, reviewer_id=alice.id, lease=LEASE)
    assert len(session.scalars(select(Job.id)).all()) == jobs_before


def test_reroll_of_an_image_job_keeps_its_image_mask_and_options(
    session: Session, alice: Reviewer
) -> None:
    made = make_run(session, items=1, templates=("scene",), seeds=2)
    staged = InputImage(
        sha256="a" * 64, storage_key="inputs/aa/a.png", width=64, height=64, mode="RGBA", bytes=10
    )
    session.add(staged)
    job = made.jobs[0]
    job.kind = "inpaint"
    job.input_image = staged.sha256
    job.options = {"mask": {"source": "alpha"}, "strength": 0.9}
    session.commit()
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=alice.id, lease=LEASE)
    assert item_id is not None

    (new_id,) = reroll(session, item_id, reviewer_id=alice.id, lease=LEASE)

    new = session.get(Job, new_id)
    assert new is not None
    assert (new.kind, new.input_image, new.mask_image, new.options) == (
        "inpaint",
        staged.sha256,
        None,
        {"mask": {"source": "alpha"}, "strength": 0.9},
    )
    assert not set(new.seeds) & set(job.seeds)


# --- races with the run's other jobs ending, on real connections (see tests/races.py) -------


def _reviewed_item_and_a_running_job(
    session: Session, reviewer: Reviewer
) -> tuple[int, int, ClaimedJob]:
    """An active run: one item rendered and claimed for review, and one job of another item
    still running (the run's last open job). Returns (run id, review item id, that claim)."""
    made = make_run(session, items=1, templates=("studio",), seeds=2, run_status=RunStatus.ACTIVE)
    running = make_job(session, made.run)
    claim = claim_job(session, running.id, worker="w", lease=LEASE)
    assert claim is not None
    sync_queue(session)
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=reviewer.id, lease=LEASE)
    assert item_id is not None
    return made.run.id, item_id, claim


@pytest.mark.parametrize("first", ["reroll", "finish"])
def test_reroll_racing_the_runs_last_job_leaves_the_run_active(
    session: Session, review_engine: Engine, alice: Reviewer, first: str
) -> None:
    """Whichever commits first, the re-roll's jobs end up in an active run (so the dispatcher
    publishes them), not in a run the last other job marked finished."""
    run_id, item_id, claim = _reviewed_item_and_a_running_job(session, alice)

    def reroll_item(session: Session) -> list[int]:
        return reroll(session, item_id, reviewer_id=alice.id, lease=LEASE)

    def finish(session: Session) -> bool:
        return finish_job(session, claim)

    if first == "reroll":
        rerolled_first = race(review_engine, reroll_item, finish, hold_after="INSERT INTO jobs")
        new_ids, finished = rerolled_first.first, rerolled_first.second
        second_waited = rerolled_first.second_waited
    else:
        # The worker has marked the run finished and not committed yet.
        finished_first = race(review_engine, finish, reroll_item, hold_after="UPDATE runs")
        finished, new_ids = finished_first.first, finished_first.second
        second_waited = finished_first.second_waited

    assert finished is True
    assert len(new_ids) == 1
    session.expire_all()
    run = session.get(Run, run_id)
    assert run is not None
    assert (run.status, run.finished_at) == (RunStatus.ACTIVE, None)
    assert second_waited  # serialised on the run's row
    review_item = session.get(ReviewItem, item_id)
    assert review_item is not None and review_item.status == ReviewStatus.REROLLING
    # The dispatcher publishes the re-roll's job; once it has ended, so has the run.
    published: list[int] = []
    dispatch(session, published.extend, requeue_after=timedelta(minutes=15))
    assert published == new_ids
    rerolled = claim_job(session, new_ids[0], worker="w", lease=LEASE)
    assert rerolled is not None and finish_job(session, rerolled)
    session.refresh(run)
    assert run.status == RunStatus.FINISHED


def test_reroll_waiting_for_a_cancel_is_refused(
    session: Session, review_engine: Engine, alice: Reviewer
) -> None:
    """A run cancelled while the item is re-rolled: the re-roll waits for the cancel and is
    refused, rather than adding pending jobs to a cancelled run that nothing would run."""
    run_id, item_id, _claim = _reviewed_item_and_a_running_job(session, alice)
    jobs_before = session.scalars(select(Job.id)).all()

    def cancel(session: Session) -> int:
        run = session.get(Run, run_id)
        assert run is not None
        return cancel_run(session, run)

    def reroll_item(session: Session) -> ReviewError | list[int]:
        try:
            return reroll(session, item_id, reviewer_id=alice.id, lease=LEASE)
        except ReviewError as exc:
            return exc

    result = race(review_engine, cancel, reroll_item, hold_after="UPDATE jobs")

    session.expire_all()
    assert session.scalars(select(Job.id)).all() == jobs_before, "jobs added to a cancelled run"
    assert isinstance(result.second, ReviewError), result.second
    assert "was cancelled" in str(result.second)
    assert result.second_waited
    review_item = session.get(ReviewItem, item_id)
    assert review_item is not None and review_item.status == ReviewStatus.OPEN
