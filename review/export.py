"""Export a run's keepers: one row per kept image of a submitted item (CSV or JSON Lines),
optionally copying the images under the ``approved/`` prefix of the same storage. Items still
open (not submitted, or re-rolling) are left out: their decisions may still change. Only
people's keeps are read: an image the keeper model rejected on its own is exported only once
a person has kept it."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from db.finishing import ImageCaption, latest_upscaled_key, run_filled_fields, submitted_keeper
from db.models import (
    CatalogueItem,
    Image,
    ImageReview,
    Job,
    Reviewer,
    ReviewItem,
    ReviewStatus,
    Run,
)
from pixelmill.approved import APPROVED_PREFIX
from pixelmill.errors import BadInputError
from pixelmill.storage import Storage

Format = Literal["csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl")

COLUMNS = (
    "item_key",
    "storage_url",
    "approved_url",
    "prompt",
    "negative_prompt",
    "seed",
    "model",
    "template",
    "variant",
    "width",
    "height",
    "sha256",
    "image_id",
    "reviewer",
    "decided_at",
    # Finishing (worker.finishing): the latest upscaled copy, the caption and alt text, and
    # the catalogue fields filled from a caption (an object; JSON text in CSV).
    "upscaled_url",
    "caption",
    "alt_text",
    "filled_fields",
)

# A spreadsheet runs a cell starting with one of these as a formula (or DDE): such cells get a
# leading apostrophe, which spreadsheets show as text (OWASP's CSV injection advice).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%")


class ExportError(BadInputError):
    pass


def escape_cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _csv_cell(value: object) -> object:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else ""
    return value


@dataclass
class Keeper:
    values: dict[str, Any]
    storage_key: str
    # The keeper's latest upscaled copy (None: not upscaled).
    upscaled_key: str | None = None


def _keepers_query(run: Run) -> Select:
    return (
        select(
            CatalogueItem.external_key,
            Image.storage_key,
            Job.prompt,
            Job.negative_prompt,
            Image.seed,
            Job.model,
            Job.template,
            Job.variant,
            Image.width,
            Image.height,
            Image.sha256,
            Image.id,
            Reviewer.name,
            ImageReview.decided_at,
            CatalogueItem.id.label("catalogue_item_id"),
            latest_upscaled_key(Image.id).label("upscaled_key"),
            ImageCaption.caption,
            ImageCaption.alt_text,
        )
        .select_from(ImageReview)
        .join(Image, Image.id == ImageReview.image_id)
        .join(Job, Job.id == Image.job_id)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .join(Reviewer, Reviewer.id == ImageReview.reviewer_id)
        .join(ReviewItem, ReviewItem.id == ImageReview.review_item_id)
        .outerjoin(ImageCaption, ImageCaption.image_id == Image.id)
        .where(
            ImageReview.run_id == run.id,
            *submitted_keeper(),
        )
        .order_by(CatalogueItem.external_key, Image.id)
        .execution_options(yield_per=5_000)
    )


def keepers(session: Session, run: Run, storage: Storage) -> Iterator[Keeper]:
    fills = run_filled_fields(session, run.id)
    for row in session.execute(_keepers_query(run)):
        yield Keeper(
            values={
                "item_key": row.external_key,
                "storage_url": storage.url(row.storage_key),
                "approved_url": "",
                "prompt": row.prompt,
                "negative_prompt": row.negative_prompt,
                "seed": int(row.seed),
                "model": row.model,
                "template": row.template,
                "variant": row.variant,
                "width": row.width,
                "height": row.height,
                "sha256": row.sha256,
                "image_id": row.id,
                "reviewer": row.name,
                "decided_at": row.decided_at.isoformat(),
                "upscaled_url": storage.url(row.upscaled_key) if row.upscaled_key else "",
                "caption": row.caption or "",
                "alt_text": row.alt_text or "",
                "filled_fields": fills.get(row.catalogue_item_id, {}),
            },
            storage_key=row.storage_key,
            upscaled_key=row.upscaled_key,
        )


def open_items_left_out(session: Session, run: Run) -> int:
    """How many of the run's review items the export leaves out: not submitted yet (open,
    held or not, or waiting for re-rolled images)."""
    count = session.scalar(
        select(func.count())
        .select_from(ReviewItem)
        .where(ReviewItem.run_id == run.id, ReviewItem.status != ReviewStatus.DONE)
    )
    return int(count or 0)


def approved_key(storage_key: str) -> str:
    return APPROVED_PREFIX + storage_key


def copy_approved(storage: Storage, keeper: Keeper) -> None:
    """Copy the kept image under approved/ (skipped if the copy is there already) and point
    the row's approved_url at it."""
    target = approved_key(keeper.storage_key)
    if not storage.exists(target):
        storage.put(target, storage.get(keeper.storage_key), content_type="image/png")
    keeper.values["approved_url"] = storage.url(target)


def export_lines(
    session: Session, run: Run, storage: Storage, fmt: str, *, copy: bool = False
) -> Iterator[str]:
    """The export, a line (or CSV record) at a time, so a large run streams."""
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        yield _drain(buffer)
    for keeper in keepers(session, run, storage):
        if copy:
            copy_approved(storage, keeper)
        if fmt == "csv":
            writer.writerow([escape_cell(_csv_cell(keeper.values[c])) for c in COLUMNS])
            yield _drain(buffer)
        else:
            yield json.dumps(keeper.values, ensure_ascii=False) + "\n"


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text
