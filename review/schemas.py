"""The JSON API's shapes (also what the pages render): pydantic models, so the OpenAPI schema
describes them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

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


class ImageOut(BaseModel):
    id: int
    job_id: int
    seed: int
    template: str
    variant: str
    prompt: str
    model: str
    width: int
    height: int
    safety: str
    url: str | None = Field(description="full image (presigned or served); None if dropped")
    thumbnail_url: str | None = Field(description="the worker's thumbnail, else the full image")
    decision: DecisionValue | None
    decided_by: str | None


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
    rerolls: int
    flagged_hidden: int = Field(description="flagged images left out (ask with flagged=true)")
    images: list[ImageOut]


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
    image_id: int
    decision: DecisionValue


class DecisionOut(BaseModel):
    image_id: int
    decision: DecisionValue | None


class UndoOut(BaseModel):
    image_id: int | None = Field(description="the image whose decision was walked back")
    decision: DecisionValue | None = Field(description="its decision now")


class SubmitOut(BaseModel):
    review_item_id: int
    rejected: int = Field(description="undecided images rejected by the submit")


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


class StatsOut(BaseModel):
    run_id: int
    run_name: str
    totals: KeepRateOut
    flagged: int
    items: dict[str, int]
    templates: list[TemplateRateOut]
    variants: list[TemplateRateOut]
    reviewers: list[ReviewerOut]
