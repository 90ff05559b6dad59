"""Auditing the keeper model's own rejections (admins): a random sample of a run's rejections
still in force, each for a person to confirm (their own reject), overturn (their own keep) or
undo (undecided again). A person's decision here is recorded like any other, with an event;
an item another reviewer holds right now is left to them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import (
    CatalogueItem,
    Decision,
    Image,
    ImageReview,
    Job,
    Reviewer,
    ReviewItem,
    ReviewStatus,
    utcnow,
)
from db.ranking import AutoReject, KeeperModel
from review.bounds import PageSize, RowId
from review.clock import aware
from review.deps import DB, Admin, State, check_csrf, csrf_token, current_reviewer
from review.images import ImageUrls
from review.queue import ClaimError, NotFoundError, image_of_item, record_decision
from review.ranking.auto_reject import audit_sample, auto_reject_counts, undo_auto_reject
from review.views import get_run

router = APIRouter(
    dependencies=[Depends(current_reviewer), Depends(check_csrf)], include_in_schema=False
)

AUDIT_SAMPLE = 24
MAX_AUDIT_SAMPLE = 200

AuditAction = Literal["confirm", "keep", "undo"]


@dataclass(frozen=True)
class AuditRow:
    image_id: int
    item_key: str
    item_status: str
    template: str
    variant: str
    seed: int
    probability: float
    threshold: float
    model_version: int
    thumbnail_url: str | None


def audit_rows(session: Session, run_id: int, size: int, urls: ImageUrls) -> list[AuditRow]:
    sample = {row.image_id: row for row in audit_sample(session, run_id, size)}
    if not sample:
        return []
    rows = session.execute(
        select(Image, Job, CatalogueItem.external_key, ReviewItem.status, KeeperModel.version)
        .join(Job, Job.id == Image.job_id)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .join(AutoReject, AutoReject.image_id == Image.id)
        .join(ReviewItem, ReviewItem.id == AutoReject.review_item_id)
        .join(KeeperModel, KeeperModel.id == AutoReject.model_id)
        .where(Image.id.in_(list(sample)))
    ).all()
    return [
        AuditRow(
            image_id=image.id,
            item_key=key,
            item_status=status,
            template=job.template,
            variant=job.variant,
            seed=int(image.seed),
            probability=sample[image.id].probability,
            threshold=sample[image.id].threshold,
            model_version=int(version),
            thumbnail_url=urls.thumbnail_url(image),
        )
        for image, job, key, status, version in rows
    ]


def _held_by_other(session: Session, item: ReviewItem, reviewer_id: int) -> str | None:
    if item.status != ReviewStatus.OPEN or item.claimed_by in (None, reviewer_id):
        return None
    if item.claim_expires_at is None or aware(item.claim_expires_at) < utcnow():
        return None
    return session.scalar(select(Reviewer.name).where(Reviewer.id == item.claimed_by))


def audit(
    session: Session, run_id: int, image_id: int, action: AuditAction, *, reviewer_id: int
) -> None:
    """Confirm, overturn or undo the model's rejection of one image of the run. Commits."""
    reject = session.get(AutoReject, image_id)
    if reject is None or reject.run_id != run_id:
        raise NotFoundError(f"the keeper model did not reject image {image_id} in run {run_id}")
    if action == "undo":
        undo_auto_reject(session, image_id, reviewer_id=reviewer_id)
        session.commit()
        return
    item = session.get(ReviewItem, reject.review_item_id)
    assert item is not None  # the foreign key
    holder = _held_by_other(session, item, reviewer_id)
    if holder is not None:
        raise ClaimError(f"{holder} is reviewing this item now: audit the image later")
    if session.get(ImageReview, image_id) is not None:
        return  # a person decided it meanwhile: that stands
    decision = Decision.KEEP if action == "keep" else Decision.REJECT
    image = image_of_item(session, item, image_id)
    record_decision(session, item, image, decision, reviewer_id=reviewer_id)
    session.commit()


@router.get("/runs/{run_id}/auto-rejects", response_class=HTMLResponse)
def audit_page(
    request: Request,
    state: State,
    session: DB,
    reviewer: Admin,
    run_id: RowId,
    size: PageSize = AUDIT_SAMPLE,
) -> Response:
    run = get_run(session, run_id)
    rows = audit_rows(session, run_id, min(size, MAX_AUDIT_SAMPLE), state.urls)
    return state.templates.TemplateResponse(
        request,
        "audit.html",
        {
            "reviewer": reviewer,
            "csrf": csrf_token(request),
            "run": run,
            "rows": rows,
            "counts": auto_reject_counts(session, run_id),
            "threshold": state.settings.auto_reject_below,
        },
    )


@router.post("/runs/{run_id}/auto-rejects/{image_id}")
def audit_action(
    session: DB,
    reviewer: Admin,
    run_id: RowId,
    image_id: RowId,
    action: Annotated[AuditAction, Form()],
) -> Response:
    audit(session, run_id, image_id, action, reviewer_id=reviewer.id)
    return RedirectResponse(f"/runs/{run_id}/auto-rejects", status_code=303)
