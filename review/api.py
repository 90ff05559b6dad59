"""The JSON API: runs, items, images, decisions (the pages' JavaScript uses it too). Behind
login; unsafe requests carry the X-CSRF-Token header. The schema is at /api/openapi.json."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.utils import get_openapi
from sqlalchemy import select

from db.models import Decision, Image, ImageReview, Job
from review.claims import claim_for
from review.deps import DB, Admin, CurrentReviewer, State, check_csrf, current_reviewer
from review.queue import NotFoundError, decide, release, submit, undo
from review.reroll import reroll
from review.schemas import (
    ClaimOut,
    DecisionIn,
    DecisionOut,
    EventOut,
    ImageOut,
    RerollOut,
    ReviewItemOut,
    ReviewItemRow,
    RunSummary,
    StatsOut,
    SubmitOut,
    UndoOut,
    decision_value,
)
from review.stats import run_stats
from review.views import (
    events,
    get_run,
    image_out,
    item_rows,
    item_view,
    run_summaries,
    stats_view,
)

router = APIRouter(
    prefix="/api", dependencies=[Depends(current_reviewer), Depends(check_csrf)], tags=["review"]
)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> dict[str, Any]:
    app = request.app
    if app.openapi_schema is None:
        app.openapi_schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=__doc__
        )
    schema: dict[str, Any] = app.openapi_schema
    return schema


@router.get("/runs")
def list_runs(session: DB, limit: int = 100) -> list[RunSummary]:
    return run_summaries(session, limit=min(limit, 1000))


@router.get("/runs/{run_id}/items")
def list_items(
    session: DB, run_id: int, status: str | None = None, after: int = 0, limit: int = 100
) -> list[ReviewItemRow]:
    """A run's review items in id order; page with ``after`` (the last id seen)."""
    get_run(session, run_id)
    return item_rows(session, run_id, status=status, after=after, limit=min(limit, 1000))


@router.post("/runs/{run_id}/claim")
def claim(state: State, session: DB, reviewer: CurrentReviewer, run_id: int) -> ClaimOut:
    """Claim the next item to review (your own open claim in the run first)."""
    return ClaimOut(review_item_id=claim_for(state, session, run_id, reviewer.id))


@router.get("/runs/{run_id}/decisions")
def list_decisions(session: DB, run_id: int, after: int = 0, limit: int = 1000) -> list[EventOut]:
    """Every review action in the run, in order (keep, reject, undo, submit, reroll)."""
    get_run(session, run_id)
    return events(session, run_id, after=after, limit=min(limit, 10_000))


@router.get("/runs/{run_id}/stats")
def stats(session: DB, _admin: Admin, run_id: int) -> StatsOut:
    return stats_view(run_stats(session, get_run(session, run_id)))


@router.get("/items/{review_item_id}")
def get_item(
    state: State, session: DB, review_item_id: int, flagged: bool = False
) -> ReviewItemOut:
    return item_view(session, review_item_id, state.urls, show_flagged=flagged)


@router.get("/images/{image_id}")
def get_image(state: State, session: DB, image_id: int) -> ImageOut:
    row = session.execute(
        select(Image, Job, ImageReview.decision)
        .join(Job, Job.id == Image.job_id)
        .outerjoin(ImageReview, ImageReview.image_id == Image.id)
        .where(Image.id == image_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"image {image_id} does not exist")
    image, job, decision = row
    return image_out(image, job, decision, None, state.urls)


@router.post("/items/{review_item_id}/decisions")
def post_decision(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: int, body: DecisionIn
) -> DecisionOut:
    """Keep or reject one image of an item you hold (409 if someone else holds it)."""
    decide(
        session,
        review_item_id,
        body.image_id,
        Decision(body.decision),
        reviewer_id=reviewer.id,
        lease=state.lease,
    )
    return DecisionOut(image_id=body.image_id, decision=body.decision)


@router.post("/items/{review_item_id}/undo")
def post_undo(state: State, session: DB, reviewer: CurrentReviewer, review_item_id: int) -> UndoOut:
    image_id = undo(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    if image_id is None:
        return UndoOut(image_id=None, decision=None)
    current = session.get(ImageReview, image_id)
    return UndoOut(
        image_id=image_id, decision=decision_value(current.decision if current else None)
    )


@router.post("/items/{review_item_id}/submit")
def post_submit(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: int
) -> SubmitOut:
    """Finish the item: undecided images are rejected."""
    rejected = submit(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    return SubmitOut(review_item_id=review_item_id, rejected=rejected)


@router.post("/items/{review_item_id}/reroll")
def post_reroll(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: int
) -> RerollOut:
    """None of these: queue fresh seeds for the item; it comes back when they are rendered."""
    job_ids = reroll(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    return RerollOut(review_item_id=review_item_id, job_ids=job_ids)


@router.post("/items/{review_item_id}/release")
def post_release(session: DB, reviewer: CurrentReviewer, review_item_id: int) -> ClaimOut:
    """Give the item back to the queue without deciding."""
    release(session, review_item_id, reviewer_id=reviewer.id)
    return ClaimOut(review_item_id=None)
