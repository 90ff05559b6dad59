""" "None of these": queue more seeds for an item through the producer's normal path.

Each of the item's (template, variant) pairs in the run gets one new ``pending`` job that copies
its latest job's parameters with the next seeds of the item's deterministic sweep (indexes after
those already rendered), so the dedupe key differs and the re-roll is reproducible. The
dispatcher publishes the jobs like any others; :func:`review.queue.sync_queue` reopens the item
when they have ended.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import (
    CatalogueItem,
    Decision,
    Job,
    JobStatus,
    ReviewAction,
    ReviewEvent,
    ReviewStatus,
    Run,
    RunStatus,
    utcnow,
)
from db.run_locks import lock_loaded_run
from db.upsert import insert_ignoring_conflicts_stmt
from pixelmill.identity import dedupe_key
from pixelmill.seeds import derive_seed
from review.metrics import DECISIONS
from review.queue import ReviewError, hold, reject_undecided

# A re-roll whose seeds were all rendered already (by another run's re-roll of the same
# catalogue item) moves on to the next sweep; this bounds how far it looks.
MAX_SWEEPS_AHEAD = 20

COPIED_COLUMNS = (
    "template",
    "variant",
    "prompt",
    "negative_prompt",
    "model",
    "scheduler",
    "steps",
    "guidance",
    "width",
    "height",
    # An image job's re-roll starts from the same staged image, mask and options.
    "kind",
    "input_image",
    "mask_image",
    "options",
)


def reroll(
    session: Session, review_item_id: int, *, reviewer_id: int, lease: timedelta
) -> list[int]:
    """Reject the item's undecided images, queue a new job per (template, variant) with fresh
    seeds, and park the item until they have rendered. Returns the new job ids. Commits."""
    item = hold(session, review_item_id, reviewer_id=reviewer_id, lease=lease)
    # The run's row, locked before the jobs are added (see db.run_locks for the lock order)
    # and held until the commit: a worker ending the run's last other job meanwhile waits,
    # then sees the new jobs and leaves the run active; one that ended it first has committed
    # the run finished, which this reads and re-activates below. A cancel waits likewise, or
    # has committed and is refused here.
    run = session.get_one(Run, item.run_id)
    lock_loaded_run(session, run)
    if run.status == RunStatus.CANCELLED:
        session.rollback()
        raise ReviewError(f"run {run.name!r} was cancelled: it takes no new jobs")
    catalogue_item = session.get(CatalogueItem, item.item_id)
    assert catalogue_item is not None

    new_ids: list[int] = []
    for (template, variant), group in _jobs_by_pair(session, item.run_id, item.item_id).items():
        job_id = _queue_more_seeds(session, run.id, catalogue_item, template, variant, group)
        if job_id is None:
            session.rollback()
            raise ReviewError(
                f"item {catalogue_item.external_key!r}, template {template!r}: no unused seeds "
                f"in the next {MAX_SWEEPS_AHEAD} sweeps"
            )
        new_ids.append(job_id)

    rejected = len(reject_undecided(session, item, reviewer_id=reviewer_id))
    item.status = ReviewStatus.REROLLING
    item.rerolls += 1
    item.claimed_by = None
    item.claim_expires_at = None
    if run.status == RunStatus.FINISHED:
        # More jobs for a finished run, as the producer does: the dispatcher only publishes
        # jobs of active runs. A paused run stays paused; its new jobs wait with the others.
        run.status = RunStatus.ACTIVE
        run.finished_at = None
    session.add(
        ReviewEvent(
            run_id=item.run_id,
            review_item_id=item.id,
            reviewer_id=reviewer_id,
            action=ReviewAction.REROLL,
        )
    )
    session.commit()
    DECISIONS.labels(decision="reroll").inc()
    if rejected:
        DECISIONS.labels(decision=Decision.REJECT.value).inc(rejected)
    return new_ids


def _jobs_by_pair(session: Session, run_id: int, item_id: int) -> dict[tuple[str, str], list[Job]]:
    """The item's jobs in the run per (template, variant), oldest first."""
    groups: dict[tuple[str, str], list[Job]] = {}
    jobs = session.scalars(
        select(Job).where(Job.run_id == run_id, Job.item_id == item_id).order_by(Job.id)
    )
    for job in jobs:
        groups.setdefault((job.template, job.variant), []).append(job)
    return groups


def _queue_more_seeds(
    session: Session,
    run_id: int,
    item: CatalogueItem,
    template: str,
    variant: str,
    group: list[Job],
) -> int | None:
    latest = group[-1]
    sweep = len(group[0].seeds)  # the sweep size the template asked for
    used = {int(seed) for job in group for seed in job.seeds}
    start = sum(len(job.seeds) for job in group)
    for _ in range(MAX_SWEEPS_AHEAD):
        seeds = [
            seed
            for index in range(start, start + sweep)
            if (seed := derive_seed(item.external_key, template, index, variant=variant))
            not in used
        ]
        start += sweep
        if not seeds:
            continue
        values = {column: getattr(latest, column) for column in COPIED_COLUMNS}
        values["seeds"] = seeds
        values["dedupe_key"] = dedupe_key(values)
        result = session.execute(
            insert_ignoring_conflicts_stmt(session, Job)
            .values(
                run_id=run_id,
                item_id=item.id,
                status=JobStatus.PENDING,
                attempts=0,
                created_at=utcnow(),
                **values,
            )
            .returning(Job.id)
        )
        job_id = result.scalar_one_or_none()
        if job_id is not None:
            return int(job_id)
    return None
