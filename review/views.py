"""Reading what the pages and the API show: runs with their review progress, one item with
its images (ranked) and decisions, the event log."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session, aliased

from db.keeper_costs import REVIEW_GAP_CAP_SECONDS, CostFigures, RunCosts
from db.models import (
    CatalogueItem,
    Image,
    ImageReview,
    Job,
    Reviewer,
    ReviewEvent,
    ReviewItem,
    ReviewStatus,
    Run,
    SafetyStatus,
)
from review.clock import seconds_until
from review.images import ImageUrls
from review.queue import NotFoundError
from review.ranked import RankedImage, RunCuts, rank_grid
from review.schemas import (
    AutoRejectOut,
    CostOut,
    CostsOut,
    EventOut,
    GroupOut,
    ImageOut,
    KeepRateOut,
    ReviewerOut,
    ReviewItemOut,
    ReviewItemRow,
    RunSummary,
    StatsOut,
    TemplateCostOut,
    TemplateRateOut,
    decision_value,
)
from review.stats import KeepRate, RunStats


def run_summaries(
    session: Session, *, limit: int = 100, run_id: int | None = None
) -> list[RunSummary]:
    def count(status: ReviewStatus) -> ColumnElement[Any]:
        return func.coalesce(func.sum(case((ReviewItem.status == status, 1), else_=0)), 0)

    counts = (
        select(
            ReviewItem.run_id,
            count(ReviewStatus.OPEN).label("open"),
            count(ReviewStatus.REROLLING).label("rerolling"),
            count(ReviewStatus.DONE).label("done"),
        )
        .group_by(ReviewItem.run_id)
        .subquery()
    )
    query = (
        select(Run, counts.c.open, counts.c.rerolling, counts.c.done)
        .outerjoin(counts, counts.c.run_id == Run.id)
        .order_by(Run.id.desc())
        .limit(limit)
    )
    if run_id is not None:
        query = query.where(Run.id == run_id)
    rows = session.execute(query).all()
    return [
        RunSummary(
            id=run.id,
            name=run.name,
            status=run.status,
            created_at=run.created_at,
            items_open=int(open_ or 0),
            items_rerolling=int(rerolling or 0),
            items_done=int(done or 0),
        )
        for run, open_, rerolling, done in rows
    ]


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFoundError(f"run {run_id} does not exist")
    return run


def image_out(
    image: Image, job: Job, decision: Any, decided_by: str | None, urls: ImageUrls
) -> ImageOut:
    """One image as the pages and the API show it."""
    url = urls.url(image.storage_key)
    return ImageOut(
        id=image.id,
        job_id=job.id,
        seed=int(image.seed),
        template=job.template,
        variant=job.variant,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        model=job.model,
        scheduler=job.scheduler,
        steps=job.steps,
        guidance=job.guidance,
        width=image.width,
        height=image.height,
        safety=image.safety,
        url=url,
        thumbnail_url=urls.thumbnail_url(image),
        decision=decision_value(decision),
        decided_by=decided_by,
    )


def _ranked_out(image: ImageOut, ranked: RankedImage) -> ImageOut:
    scored = ranked.scored
    reject = ranked.auto_reject
    return image.model_copy(
        update={
            "probability": scored.probability,
            "model_version": scored.model_version,
            "prior": scored.prior,
            "clip_score": scored.clip_score,
            "aesthetic_score": scored.aesthetic_score,
            "image_similarity": scored.image_similarity,
            "group": ranked.group,
            "group_size": ranked.group_size,
            "group_lead": ranked.lead,
            "below_cut": ranked.below_cut,
            "auto_reject": None
            if reject is None
            else AutoRejectOut(
                probability=reject.probability,
                threshold=reject.threshold,
                model_version=reject.model_version,
                in_force=ranked.auto_rejected,
            ),
        }
    )


def _item_images(
    session: Session, item: ReviewItem, urls: ImageUrls, show_flagged: bool
) -> tuple[dict[int, ImageOut], int]:
    """The item's images shown, in render order, and how many flagged ones were left out."""
    decider = aliased(Reviewer)
    images = session.execute(
        select(Image, Job, ImageReview.decision, decider.name)
        .join(Job, Job.id == Image.job_id)
        .outerjoin(ImageReview, ImageReview.image_id == Image.id)
        .outerjoin(decider, decider.id == ImageReview.reviewer_id)
        .where(Job.run_id == item.run_id, Job.item_id == item.item_id)
        .order_by(Job.template, Job.variant, Job.id, Image.seed)
    ).all()
    shown: dict[int, ImageOut] = {}
    hidden = 0
    for image, job, decision, decided_by in images:
        if image.safety == SafetyStatus.FLAGGED and not show_flagged:
            hidden += 1
            continue
        shown[image.id] = image_out(image, job, decision, decided_by, urls)
    return shown, hidden


def item_view(
    session: Session,
    review_item_id: int,
    urls: ImageUrls,
    *,
    show_flagged: bool = False,
    duplicate_similarity: float = 0.97,
    cuts: RunCuts | None = None,
) -> ReviewItemOut:
    """One item with its images best first (see review.ranked), for the grid and the API."""
    claimer = aliased(Reviewer)
    row = session.execute(
        select(ReviewItem, Run.name, CatalogueItem, claimer.name)
        .join(Run, Run.id == ReviewItem.run_id)
        .join(CatalogueItem, CatalogueItem.id == ReviewItem.item_id)
        .outerjoin(claimer, claimer.id == ReviewItem.claimed_by)
        .where(ReviewItem.id == review_item_id)
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"review item {review_item_id} does not exist")
    item, run_name, catalogue_item, claimed_by = row
    shown, hidden = _item_images(session, item, urls, show_flagged)
    grid = rank_grid(
        session,
        run_id=item.run_id,
        item_id=item.item_id,
        review_item_id=item.id,
        shown=list(shown),
        decided={image_id for image_id, out in shown.items() if out.decision is not None},
        duplicate_similarity=duplicate_similarity,
        cut=(cuts or RunCuts(0.0)).get(session, item.run_id),
    )
    return ReviewItemOut(
        id=item.id,
        run_id=item.run_id,
        run_name=run_name,
        item_id=item.item_id,
        item_key=catalogue_item.external_key,
        fields=catalogue_item.fields,
        status=item.status,
        claimed_by=claimed_by,
        claim_expires_at=item.claim_expires_at,
        hold_seconds=seconds_until(item.claim_expires_at),
        rerolls=item.rerolls,
        flagged_hidden=hidden,
        ranked_by=grid.ranked_by,
        cut=grid.cut,
        auto_rejected=sum(image.auto_rejected for image in grid.images),
        groups=[GroupOut(lead=members[0], members=members) for members in grid.groups],
        images=[_ranked_out(shown[r.scored.image_id], r) for r in grid.images],
    )


def item_rows(
    session: Session, run_id: int, *, status: str | None, after: int, limit: int
) -> list[ReviewItemRow]:
    claimer = aliased(Reviewer)
    submitter = aliased(Reviewer)
    query = (
        select(ReviewItem, CatalogueItem.external_key, claimer.name, submitter.name)
        .join(CatalogueItem, CatalogueItem.id == ReviewItem.item_id)
        .outerjoin(claimer, claimer.id == ReviewItem.claimed_by)
        .outerjoin(submitter, submitter.id == ReviewItem.submitted_by)
        .where(ReviewItem.run_id == run_id, ReviewItem.id > after)
        .order_by(ReviewItem.id)
        .limit(limit)
    )
    if status is not None:
        query = query.where(ReviewItem.status == status)
    return [
        ReviewItemRow(
            id=item.id,
            item_key=key,
            status=item.status,
            claimed_by=claimed_by,
            claim_expires_at=item.claim_expires_at,
            rerolls=item.rerolls,
            submitted_by=submitted_by,
            submitted_at=item.submitted_at,
        )
        for item, key, claimed_by, submitted_by in session.execute(query)
    ]


def events(session: Session, run_id: int, *, after: int, limit: int) -> list[EventOut]:
    rows = session.execute(
        select(ReviewEvent, Reviewer.name)
        .join(Reviewer, Reviewer.id == ReviewEvent.reviewer_id)
        .where(ReviewEvent.run_id == run_id, ReviewEvent.id > after)
        .order_by(ReviewEvent.id)
        .limit(limit)
    )
    return [
        EventOut(
            id=event.id,
            review_item_id=event.review_item_id,
            image_id=event.image_id,
            reviewer=name,
            action=event.action,
            previous=event.previous,
            undone=event.undone,
            created_at=event.created_at,
        )
        for event, name in rows
    ]


def _rate(figures: KeepRate) -> KeepRateOut:
    return KeepRateOut(
        images=figures.images,
        reviewed=figures.reviewed,
        kept=figures.kept,
        keep_rate=figures.keep_rate,
    )


def stats_view(stats: RunStats) -> StatsOut:
    return StatsOut(
        run_id=stats.run_id,
        run_name=stats.run_name,
        totals=_rate(stats.totals),
        flagged=stats.flagged,
        items=stats.items,
        templates=[
            TemplateRateOut(template=name, **_rate(figures).model_dump())
            for name, figures in stats.templates.items()
        ],
        variants=[
            TemplateRateOut(template=template, variant=variant, **_rate(figures).model_dump())
            for (template, variant), figures in stats.variants.items()
        ],
        reviewers=[
            ReviewerOut(
                reviewer=speed.name,
                decisions=speed.decisions,
                active_hours=speed.active_seconds / 3600.0,
                decisions_per_hour=speed.decisions_per_hour,
            )
            for speed in stats.reviewers
        ],
        costs=costs_view(stats.costs),
    )


def _cost(figures: CostFigures) -> dict[str, Any]:
    return CostOut(
        images=figures.images,
        gpu_seconds=figures.gpu_seconds,
        gpu_seconds_per_image=figures.gpu_seconds_per_image,
        gpu_seconds_per_keeper=figures.gpu_seconds_per_keeper,
        kept=figures.kept,
        auto_rejected=figures.auto_rejected,
        reviewer_seconds=figures.reviewer_seconds,
        reviewer_seconds_per_keeper=figures.reviewer_seconds_per_keeper,
        skipped_seeds=figures.skipped_seeds,
        gpu_seconds_saved=figures.gpu_seconds_saved,
        keeper_recall=figures.keeper_recall,
    ).model_dump()


def costs_view(costs: RunCosts) -> CostsOut:
    return CostsOut(
        top_k=costs.top_k,
        review_gap_cap_seconds=REVIEW_GAP_CAP_SECONDS,
        totals=CostOut(**_cost(costs.total)),
        templates=[
            TemplateCostOut(template=name, **_cost(figures))
            for name, figures in costs.templates.items()
        ],
        variants=[
            TemplateCostOut(template=template, variant=variant, **_cost(figures))
            for (template, variant), figures in sorted(costs.variants.items())
        ],
    )
