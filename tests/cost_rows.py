"""One small run whose costs are known by hand: the rows the cost tests of the stats page,
`pixelmill status`, the exporter and db.keeper_costs read.

Run "costed" (source cat.csv), every job of model m, 2 steps:
- item A: studio/"" seeds 1, 2, 3 (flagged), 14 at 2 GPU-s each; outdoor/dusk sweeps 4 to 8,
  renders 4, 5 at 4 GPU-s each, early stop skips 6, 7, 8 (3 x its mean 4 = 12 GPU-s saved).
- item B (128 px wide): studio/"" seed 13 at 6 GPU-s; outdoor/dusk skipped both its seeds, 11
  and 12 (2 x the mean of the run's images of that model, steps and size, 6 = 12).
- people: ann keeps 1, rejects 2, keeps 4, rejects 5, submits A (at 0, 10, 30, 40, 50 s), then
  after a 1,000 s break keeps 13 and submits B (1,050 and 1,060 s); bo undoes on A at 5 s and
  submits on A at 65 s (his first event costs nothing, his second 60 s).
- the model: auto-rejects 14 (still standing), 5 (overridden: ann decided it) and 3 (undone).
- predictions on A: 3 (flagged, hidden) .95, 1 .9, 2 .8, 5 .7, 4 .3, 14 .1: kept 1 ranks first,
  kept 4 fourth; 13 has none.
Another run with one kept image stays out of every figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db.models import (
    CatalogueItem,
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
    Run,
    SafetyStatus,
)
from db.ranking import AutoReject, KeeperModel, KeeperPrediction
from tests.factories import image_row, make_item, make_job, make_reviewer, make_run

START = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

# Seconds of review, by the definition in db.keeper_costs: ann 0+10+20+10+10 on A, 300 (the
# break, capped) + 10 on B; bo 0 + 60 on A. Item A's 110 s are shared by its 4 decided images.
REVIEW_A = 50.0 + 60.0
REVIEW_B = 310.0
REVIEWER_SECONDS = REVIEW_A + REVIEW_B
STUDIO_REVIEW = REVIEW_A / 2 + REVIEW_B
DUSK_REVIEW = REVIEW_A / 2


@dataclass
class CostedRun:
    run: Run
    other: Run
    images: dict[int, Image]  # by seed


def _job(
    session: Session, run: Run, item: CatalogueItem, template: str, variant: str, **values: Any
) -> Job:
    values.setdefault("status", JobStatus.DONE)
    return make_job(
        session,
        run,
        item=item,
        commit=False,
        template=template,
        variant=variant,
        model="m",
        steps=2,
        **values,
    )


def _render(
    session: Session, job: Job, seconds: float, seeds: list[int] | None = None
) -> dict[int, Image]:
    """Images of the job's seeds (or of ``seeds``: the others skipped by early stop)."""
    images = {
        seed: image_row(job.id, seed, render_seconds=seconds, width=job.width, height=job.height)
        for seed in (job.seeds if seeds is None else seeds)
    }
    session.add_all(images.values())
    session.flush()
    return images


def _event(
    session: Session,
    item: ReviewItem,
    reviewer: Reviewer,
    action: str,
    at: float,
    image: Image | None = None,
) -> None:
    session.add(
        ReviewEvent(
            run_id=item.run_id,
            review_item_id=item.id,
            reviewer_id=reviewer.id,
            action=action,
            image_id=image.id if image else None,
            created_at=START + timedelta(seconds=at),
        )
    )


def _decide(
    session: Session, item: ReviewItem, reviewer: Reviewer, image: Image, keep: bool, at: float
) -> None:
    decision = Decision.KEEP if keep else Decision.REJECT
    session.add(
        ImageReview(
            image_id=image.id,
            run_id=item.run_id,
            review_item_id=item.id,
            decision=decision,
            reviewer_id=reviewer.id,
            decided_at=START + timedelta(seconds=at),
        )
    )
    _event(session, item, reviewer, decision.value, at, image)


def make_costed_run(session: Session) -> CostedRun:
    """The rows the module docstring describes (flushed, not committed)."""
    run = make_run(session, name="costed", source="cat.csv")
    item_a = make_item(session, source="cat.csv")
    item_b = make_item(session, source="cat.csv")
    images = _render(session, _job(session, run, item_a, "studio", "", seeds=[1, 2, 3, 14]), 2.0)
    images[3].safety = SafetyStatus.FLAGGED
    sweep = {"seeds": [4, 5, 6, 7, 8], "skipped_seeds": [6, 7, 8]}
    images |= _render(session, _job(session, run, item_a, "outdoor", "dusk", **sweep), 4.0, [4, 5])
    wide = {"width": 128}
    images |= _render(session, _job(session, run, item_b, "studio", "", seeds=[13], **wide), 6.0)
    _job(session, run, item_b, "outdoor", "dusk", seeds=[11, 12], skipped_seeds=[11, 12], **wide)
    ann, bo = make_reviewer(session, "ann"), make_reviewer(session, "bo")
    review_a = ReviewItem(run_id=run.id, item_id=item_a.id, status=ReviewStatus.DONE)
    review_b = ReviewItem(run_id=run.id, item_id=item_b.id, status=ReviewStatus.DONE)
    session.add_all([review_a, review_b])
    session.flush()
    for seed, keep, at in ((1, True, 0), (2, False, 10), (4, True, 30), (5, False, 40)):
        _decide(session, review_a, ann, images[seed], keep, at)
    _event(session, review_a, ann, ReviewAction.SUBMIT, 50)
    _event(session, review_a, bo, ReviewAction.UNDO, 5)
    _event(session, review_a, bo, ReviewAction.SUBMIT, 65)
    _decide(session, review_b, ann, images[13], True, 1050)
    _event(session, review_b, ann, ReviewAction.SUBMIT, 1060)
    _model_rows(session, run, review_a, images, undoer=bo)
    other = make_run(session, name="other", source="cat.csv")
    other_item = make_item(session, source="cat.csv")
    other_images = _render(session, _job(session, other, other_item, "studio", "", seeds=[1]), 9.0)
    other_review = ReviewItem(run_id=other.id, item_id=other_item.id, status=ReviewStatus.DONE)
    session.add(other_review)
    session.flush()
    _decide(session, other_review, ann, other_images[1], True, 0)
    session.flush()
    return CostedRun(run, other, images)


def _model_rows(
    session: Session, run: Run, item: ReviewItem, images: dict[int, Image], undoer: Reviewer
) -> None:
    model = KeeperModel(
        source="cat.csv",
        version=1,
        scorer="s" * 64,
        trained_on=10,
        held_out=2,
        auc=0.8,
        decisions_seen=10,
        parameters={},
    )
    session.add(model)
    session.flush()
    for seed, probability in ((3, 0.95), (1, 0.9), (2, 0.8), (5, 0.7), (4, 0.3), (14, 0.1)):
        session.add(
            KeeperPrediction(image_id=images[seed].id, model_id=model.id, probability=probability)
        )
    for seed, undone in ((14, False), (5, False), (3, True)):
        session.add(
            AutoReject(
                image_id=images[seed].id,
                run_id=run.id,
                review_item_id=item.id,
                model_id=model.id,
                probability=0.1,
                threshold=0.2,
                undone_by=undoer.id if undone else None,
                undone_at=START + timedelta(seconds=70) if undone else None,
            )
        )
    session.flush()
