"""The JSON API: runs, items, images, decisions (the pages' JavaScript uses it too). Behind
login; unsafe requests carry the X-CSRF-Token header. The schema is at /api/openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.utils import get_openapi
from sqlalchemy import select

from db.models import Decision, Image, ImageReview, Job
from pixelmill.tasks import publish_finishing
from review.bounds import After, OptionalRowId, PageSize, RowId
from review.bulk import Changed, Wanted, decide_many, keep_top, reject_rest
from review.claims import claim_for
from review.clock import seconds_until
from review.deps import DB, Admin, CurrentReviewer, State, check_csrf, current_reviewer
from review.queue import NotFoundError, decide, hold, image_of_item, release, submit, undo_last
from review.ranking.auto_reject import undo_auto_reject
from review.reopen import reopen
from review.reroll import reroll
from review.schemas import (
    AutoRejectUndoOut,
    BatchIn,
    BatchOut,
    ChangedOut,
    ClaimOut,
    DecisionIn,
    DecisionOut,
    EventOut,
    HoldOut,
    ImageOut,
    KeepTopIn,
    ReopenOut,
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

ItemStatus = Literal["open", "rerolling", "done"]


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
def list_runs(session: DB, limit: PageSize = 100) -> list[RunSummary]:
    return run_summaries(session, limit=min(limit, 1000))


@router.get("/runs/{run_id}/items")
def list_items(
    session: DB,
    run_id: RowId,
    status: ItemStatus | None = None,
    after: After = 0,
    limit: PageSize = 100,
) -> list[ReviewItemRow]:
    """A run's review items in id order; page with ``after`` (the last id seen)."""
    get_run(session, run_id)
    return item_rows(session, run_id, status=status, after=after, limit=min(limit, 1000))


@router.post("/runs/{run_id}/claim")
def claim(
    state: State,
    session: DB,
    reviewer: CurrentReviewer,
    run_id: RowId,
    besides: OptionalRowId = None,
) -> ClaimOut:
    """Claim the next item to review (your own open claim in the run first). ``besides``:
    the item on screen, when fetching the next one ahead of time."""
    return ClaimOut(review_item_id=claim_for(state, session, run_id, reviewer.id, besides=besides))


@router.get("/runs/{run_id}/decisions")
def list_decisions(
    session: DB, run_id: RowId, after: After = 0, limit: PageSize = 1000
) -> list[EventOut]:
    """Every review action in the run, in order (keep, reject, undo, submit, reroll)."""
    get_run(session, run_id)
    return events(session, run_id, after=after, limit=min(limit, 10_000))


@router.get("/runs/{run_id}/stats")
def stats(session: DB, _admin: Admin, run_id: RowId) -> StatsOut:
    return stats_view(run_stats(session, get_run(session, run_id)))


@router.get("/items/{review_item_id}")
def get_item(
    state: State, session: DB, review_item_id: RowId, flagged: bool = False
) -> ReviewItemOut:
    """The item and its images best first: each image's scores, predicted keep probability,
    near-duplicate group and place against the run's cut, and the model's own rejections."""
    return item_view(
        session,
        review_item_id,
        state.urls,
        show_flagged=flagged,
        duplicate_similarity=state.duplicate_similarity,
        cuts=state.cuts,
    )


@router.get("/images/{image_id}")
def get_image(state: State, session: DB, image_id: RowId) -> ImageOut:
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


def _changed(changed: list[Changed]) -> list[ChangedOut]:
    return [ChangedOut(image_id=c.image_id, decision=decision_value(c.decision)) for c in changed]


@router.post("/items/{review_item_id}/decisions")
def post_decision(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId, body: DecisionIn
) -> DecisionOut:
    """Keep or reject one image of an item you hold (409 if someone else holds it); with
    ``group``, its near-duplicate group: the image as asked, the group's undecided other
    members rejected as duplicates."""
    if body.group:
        changed = decide_many(
            session,
            review_item_id,
            [Wanted(body.image_id, Decision(body.decision), group=True)],
            reviewer_id=reviewer.id,
            lease=state.lease,
            duplicate_similarity=state.duplicate_similarity,
        )
    else:
        decide(
            session,
            review_item_id,
            body.image_id,
            Decision(body.decision),
            reviewer_id=reviewer.id,
            lease=state.lease,
        )
        changed = [Changed(body.image_id, Decision(body.decision))]
    return DecisionOut(image_id=body.image_id, decision=body.decision, changed=_changed(changed))


@router.post("/items/{review_item_id}/decisions/batch")
def post_decisions(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId, body: BatchIn
) -> BatchOut:
    """Several decisions as one action (one undo walks them back), e.g. "keep the top N" of
    the grid as the reviewer sees it."""
    wanted = [Wanted(d.image_id, Decision(d.decision), group=d.group) for d in body.decisions]
    changed = decide_many(
        session,
        review_item_id,
        wanted,
        reviewer_id=reviewer.id,
        lease=state.lease,
        duplicate_similarity=state.duplicate_similarity,
    )
    return BatchOut(changed=_changed(changed))


@router.post("/items/{review_item_id}/keep-top")
def post_keep_top(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId, body: KeepTopIn
) -> BatchOut:
    """Keep the ``count`` best undecided images (near-duplicate groups closed: each keeps its
    best member and rejects its undecided duplicates); what is decided already stays."""
    changed = keep_top(
        session,
        review_item_id,
        body.count,
        reviewer_id=reviewer.id,
        lease=state.lease,
        duplicate_similarity=state.duplicate_similarity,
    )
    return BatchOut(changed=_changed(changed))


@router.post("/items/{review_item_id}/reject-rest")
def post_reject_rest(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId
) -> BatchOut:
    """Reject every undecided image (flagged images and the model's rejections aside),
    without submitting."""
    changed = reject_rest(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    return BatchOut(changed=_changed(changed))


@router.post("/items/{review_item_id}/auto-rejects/{image_id}/undo")
def post_undo_auto_reject(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId, image_id: RowId
) -> AutoRejectUndoOut:
    """Undo the keeper model's rejection of one image of an item you hold: it is undecided
    again (the rejection stays on record, undone by you)."""
    item = hold(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    image_of_item(session, item, image_id)
    undone = undo_auto_reject(session, image_id, reviewer_id=reviewer.id)
    session.commit()
    return AutoRejectUndoOut(image_id=image_id, undone=undone)


@router.post("/items/{review_item_id}/hold")
def post_hold(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId
) -> HoldOut:
    """Renew your hold of the item (the page does while you work); 409 if someone else
    took it over."""
    item = hold(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    session.commit()
    assert item.claim_expires_at is not None
    return HoldOut(
        review_item_id=item.id,
        claim_expires_at=item.claim_expires_at,
        hold_seconds=seconds_until(item.claim_expires_at),
    )


@router.post("/items/{review_item_id}/undo")
def post_undo(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId
) -> UndoOut:
    """Walk back your last action on the item: one decision, or all of a group's, a "keep the
    top N" or a "reject the rest"."""
    undone = undo_last(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    if not undone:
        return UndoOut(image_id=None, decision=None)
    decisions = dict(
        session.execute(
            select(ImageReview.image_id, ImageReview.decision).where(
                ImageReview.image_id.in_(undone)
            )
        ).all()
    )
    changed = [
        ChangedOut(image_id=image_id, decision=decision_value(decisions.get(image_id)))
        for image_id in undone
    ]
    return UndoOut(image_id=changed[0].image_id, decision=changed[0].decision, changed=changed)


@router.post("/items/{review_item_id}/submit")
def post_submit(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId
) -> SubmitOut:
    """Finish the item: undecided images are rejected. Its keepers are then queued for
    finishing (upscale, captions) where that is configured."""
    rejected = submit(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    publish_finishing(state.settings, review_item_id)  # after the submit's commit
    return SubmitOut(review_item_id=review_item_id, rejected=rejected)


@router.post("/items/{review_item_id}/reopen")
def post_reopen(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId
) -> ReopenOut:
    """Undo your last submit within PIXELMILL_REVIEW_REOPEN_SECONDS: the item is open and
    yours again, the images the submit rejected undecided again."""
    undecided = reopen(
        session,
        review_item_id,
        reviewer_id=reviewer.id,
        lease=state.lease,
        window=state.reopen_window,
    )
    return ReopenOut(review_item_id=review_item_id, undecided=undecided)


@router.post("/items/{review_item_id}/reroll")
def post_reroll(
    state: State, session: DB, reviewer: CurrentReviewer, review_item_id: RowId
) -> RerollOut:
    """None of these: queue fresh seeds for the item; it comes back when they are rendered."""
    job_ids = reroll(session, review_item_id, reviewer_id=reviewer.id, lease=state.lease)
    return RerollOut(review_item_id=review_item_id, job_ids=job_ids)


@router.post("/items/{review_item_id}/release")
def post_release(session: DB, reviewer: CurrentReviewer, review_item_id: RowId) -> ClaimOut:
    """Give the item back to the queue without deciding (409 if you do not hold it)."""
    release(session, review_item_id, reviewer_id=reviewer.id)
    return ClaimOut(review_item_id=None)
