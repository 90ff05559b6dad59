"""The JSON API's shapes (also what the pages render): pydantic models, so the OpenAPI schema
describes them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from review.bounds import MAX_ID

DecisionValue = Literal["keep", "reject"]


def decision_value(value: str | None) -> DecisionValue | None:
    """A stored decision as the API's literal type (the schema's CHECK allows nothing else)."""
    if value is None:
        return None
    if value == "keep":
        return "keep"
    if value == "reject":
        return "reject"
    raise ValueError(f"unknown decision {value!r}")


class RunSummary(BaseModel):
    id: int
    name: str
    status: str
    created_at: datetime
    items_open: int
    items_rerolling: int
    items_done: int


class AutoRejectOut(BaseModel):
    """The keeper model's own rejection of the image (never a person's)."""

    probability: float
    threshold: float
    model_version: int
    in_force: bool = Field(description="no person decided the image and none undid this")


class ImageOut(BaseModel):
    id: int
    job_id: int
    seed: int
    template: str
    variant: str
    prompt: str
    negative_prompt: str
    model: str
    scheduler: str | None
    steps: int
    guidance: float
    width: int
    height: int
    safety: str
    url: str | None = Field(description="full image (presigned or served); None if dropped")
    thumbnail_url: str | None = Field(
        description="the image's thumbnail (made on its first view when it has none yet)"
    )
    decision: DecisionValue | None
    decided_by: str | None
    probability: float | None = Field(
        default=None, description="predicted keep probability (the source's keeper model)"
    )
    model_version: int | None = Field(default=None, description="the model behind it")
    prior: float | None = Field(
        default=None, description="the order before any model, from the scores below"
    )
    clip_score: float | None = Field(default=None, description="prompt-image similarity")
    aesthetic_score: float | None = None
    image_similarity: float | None = Field(
        default=None, description="similarity to the catalogue photo the job started from"
    )
    group: int | None = Field(
        default=None, description="near-duplicate group: the id of its best member"
    )
    group_size: int = 1
    group_lead: bool = Field(default=True, description="the member the grid shows")
    below_cut: bool = Field(default=False, description="below the run's cut line")
    auto_reject: AutoRejectOut | None = None


class GroupOut(BaseModel):
    lead: int = Field(description="the best member, shown in the grid")
    members: list[int] = Field(description="every member, best first (the lead included)")


class ReviewItemOut(BaseModel):
    id: int
    run_id: int
    run_name: str
    item_id: int
    item_key: str
    fields: dict[str, Any]
    status: str
    claimed_by: str | None
    claim_expires_at: datetime | None
    hold_seconds: int = Field(description="seconds left on the claim (0: none, or expired)")
    rerolls: int
    flagged_hidden: int = Field(description="flagged images left out (ask with flagged=true)")
    ranked_by: Literal["model", "scores", "render order"] = Field(
        description="what orders the images: predicted keep probability, the prior from "
        "the CLIP and aesthetic scores, or (nothing scored) render order"
    )
    cut: float | None = Field(
        description="the run's cut line: its mean predicted keep probability (None without "
        "predictions); images below it are marked below_cut"
    )
    auto_rejected: int = Field(description="images the keeper model rejected, in force")
    groups: list[GroupOut] = Field(description="near-duplicate groups, best first")
    images: list[ImageOut] = Field(
        description="best first: each group's members together, best first; the model's "
        "rejections in force last"
    )


class ReviewItemRow(BaseModel):
    id: int
    item_key: str
    status: str
    claimed_by: str | None
    claim_expires_at: datetime | None
    rerolls: int
    submitted_by: str | None
    submitted_at: datetime | None


class DecisionIn(BaseModel):
    image_id: int = Field(ge=1, le=MAX_ID)
    decision: DecisionValue
    group: bool = Field(
        default=False,
        description="decide the image's near-duplicate group: the image as asked, the "
        "group's undecided other members rejected as duplicates",
    )


class BatchIn(BaseModel):
    decisions: list[DecisionIn] = Field(max_length=1000)


class KeepTopIn(BaseModel):
    count: int = Field(ge=1, le=1000)


class ChangedOut(BaseModel):
    image_id: int
    decision: DecisionValue | None


class DecisionOut(BaseModel):
    image_id: int
    decision: DecisionValue | None
    changed: list[ChangedOut] = Field(
        default_factory=list, description="every image decided (a group's duplicates too)"
    )


class BatchOut(BaseModel):
    changed: list[ChangedOut]


class UndoOut(BaseModel):
    image_id: int | None = Field(description="the image whose decision was walked back")
    decision: DecisionValue | None = Field(description="its decision now")
    changed: list[ChangedOut] = Field(
        default_factory=list, description="every image of the action walked back"
    )


class AutoRejectUndoOut(BaseModel):
    image_id: int
    undone: bool = Field(description="False: no rejection by the model was in force")


class SubmitOut(BaseModel):
    review_item_id: int
    rejected: int = Field(description="undecided images rejected by the submit")


class HoldOut(BaseModel):
    review_item_id: int
    claim_expires_at: datetime
    hold_seconds: int = Field(description="seconds left on your hold, renewed by this call")


class ReopenOut(BaseModel):
    review_item_id: int
    undecided: int = Field(description="images the submit had rejected, undecided again")


class RerollOut(BaseModel):
    review_item_id: int
    job_ids: list[int]


class ClaimOut(BaseModel):
    review_item_id: int | None = Field(description="None: nothing to review in this run now")


class EventOut(BaseModel):
    id: int
    review_item_id: int
    image_id: int | None
    reviewer: str
    action: str
    previous: str | None
    undone: bool
    created_at: datetime


class KeepRateOut(BaseModel):
    images: int
    reviewed: int
    kept: int
    keep_rate: float | None


class TemplateRateOut(KeepRateOut):
    template: str
    variant: str | None = None


class ReviewerOut(BaseModel):
    reviewer: str
    decisions: int
    active_hours: float
    decisions_per_hour: float | None


class CostOut(BaseModel):
    """What keepers cost (db.keeper_costs defines each figure); None where nothing divides."""

    images: int
    gpu_seconds: float = Field(description="render_seconds of every image, flagged ones too")
    gpu_seconds_per_image: float | None
    gpu_seconds_per_keeper: float | None = Field(description="so far: high until review ends")
    kept: int
    auto_rejected: int = Field(description="standing rejections by the keeper model")
    reviewer_seconds: float
    reviewer_seconds_per_keeper: float | None
    skipped_seeds: int = Field(description="seeds early stop left unrendered")
    gpu_seconds_saved: float = Field(description="skipped seeds x their job's mean render time")
    keeper_recall: float | None = Field(
        description="kept images ranked in their item's top k, over kept images with a prediction"
    )


class TemplateCostOut(CostOut):
    template: str
    variant: str | None = None


class CostsOut(BaseModel):
    top_k: int = Field(description="the k of keeper_recall")
    review_gap_cap_seconds: float = Field(
        description="a longer pause between a reviewer's actions counts as this long"
    )
    totals: CostOut
    templates: list[TemplateCostOut]
    variants: list[TemplateCostOut]


class StatsOut(BaseModel):
    run_id: int
    run_name: str
    totals: KeepRateOut
    flagged: int
    items: dict[str, int]
    templates: list[TemplateRateOut]
    variants: list[TemplateRateOut]
    reviewers: list[ReviewerOut]
    costs: CostsOut
