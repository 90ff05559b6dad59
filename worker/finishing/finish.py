"""Finishing keepers: each kept image of a submitted item upscaled (under the approved
prefix) and captioned, and the item's empty catalogue field filled from a caption.

Resumable and idempotent: what a keeper still lacks is read from the database each time, each
keeper's results are committed as they are made, and an upscaled copy's key follows from the
image, the scale and the upscaler, so running again (a redelivered task, ``pixelmill finish``
after a crash) makes only what is missing. Two workers finishing the same keeper at once
store it once: the row is inserted before the object is written, in one transaction, and the
one whose insert finds the row already there writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.PngImagePlugin
from sqlalchemy import Select, exists, false, select
from sqlalchemy.orm import Session, sessionmaker

from db.finishing import CatalogueFill, ImageCaption, UpscaledImage, submitted_keeper
from db.models import CatalogueItem, Decision, Image, ImageReview, ReviewItem, ReviewStatus
from db.upsert import insert_ignoring_conflicts, insert_ignoring_conflicts_stmt
from pixelmill.approved import upscaled_key
from pixelmill.settings import Settings
from pixelmill.storage import Storage, StorageError
from worker.finishing.caption import Captioner, alt_text
from worker.finishing.upscale import Upscaler
from worker.identity import library_versions

# The PNG text chunk of an upscaled copy saying what it was made from (its source's own
# chunks, the generation parameters, are copied as they are).
UPSCALE_CHUNK = "pixelmill-upscale"


@dataclass(frozen=True)
class PendingKeeper:
    """A kept image and what it still lacks."""

    image_id: int
    item_id: int
    storage_key: str
    upscale: bool
    caption: bool


@dataclass
class FinishingReport:
    keepers: int = 0  # kept images of submitted items in scope
    upscaled: int = 0
    captioned: int = 0
    filled: int = 0  # catalogue fields filled
    failures: list[str] = field(default_factory=list)  # keepers whose image could not be read

    def add(self, other: FinishingReport) -> None:
        self.keepers += other.keepers
        self.upscaled += other.upscaled
        self.captioned += other.captioned
        self.filled += other.filled
        self.failures.extend(other.failures)

    def summary(self) -> str:
        failed = f", {len(self.failures)} unreadable" if self.failures else ""
        return (
            f"{self.keepers} keepers: {self.upscaled} upscaled, {self.captioned} captioned, "
            f"{self.filled} fields filled{failed}"
        )


Progress = Callable[[int, int], None]


@dataclass
class Finisher:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    upscaler: Upscaler | None
    captioner: Captioner | None

    # --- what is left to do ---------------------------------------------------------------

    def _keepers(self, *, run_id: int | None, review_item_id: int | None) -> Select:
        """The kept images of submitted items (of the run, or the review item), with whether
        each already has this upscaler's copy and a caption."""
        upscaler = self.upscaler
        upscaled = (
            exists().where(
                UpscaledImage.image_id == Image.id,
                UpscaledImage.scale == upscaler.scale,
                UpscaledImage.model_sha256 == upscaler.identity,
            )
            if upscaler is not None
            else false()
        )
        captioned = exists().where(ImageCaption.image_id == Image.id)
        query = (
            select(
                Image.id,
                ReviewItem.item_id,
                Image.storage_key,
                upscaled.label("upscaled"),
                captioned.label("captioned"),
            )
            .select_from(ImageReview)
            .join(Image, Image.id == ImageReview.image_id)
            .join(ReviewItem, ReviewItem.id == ImageReview.review_item_id)
            .where(*submitted_keeper())
            .order_by(Image.id)
        )
        if run_id is not None:
            query = query.where(ImageReview.run_id == run_id)
        if review_item_id is not None:
            query = query.where(ImageReview.review_item_id == review_item_id)
        return query

    def pending(
        self, *, run_id: int | None = None, review_item_id: int | None = None
    ) -> tuple[int, list[PendingKeeper]]:
        """How many keepers are in scope, and those that still lack something."""
        with self.sessions() as session:
            rows = session.execute(self._keepers(run_id=run_id, review_item_id=review_item_id))
            keepers = [
                PendingKeeper(
                    image_id=row.id,
                    item_id=row.item_id,
                    storage_key=row.storage_key,
                    upscale=self.upscaler is not None and not row.upscaled,
                    caption=self.captioner is not None and not row.captioned,
                )
                for row in rows
            ]
        return len(keepers), [k for k in keepers if k.upscale or k.caption]

    # --- finishing --------------------------------------------------------------------------

    def finish_item(self, review_item_id: int) -> FinishingReport:
        """Finish a submitted review item's keepers (nothing if it is not submitted)."""
        return self._finish(run_id=None, review_item_id=review_item_id, progress=None)

    def finish_run(self, run_id: int, *, progress: Progress | None = None) -> FinishingReport:
        """Finish the keepers of every submitted item of the run; ``progress(done, total)``
        after each keeper that needed work."""
        return self._finish(run_id=run_id, review_item_id=None, progress=progress)

    def _finish(
        self, *, run_id: int | None, review_item_id: int | None, progress: Progress | None
    ) -> FinishingReport:
        total, pending = self.pending(run_id=run_id, review_item_id=review_item_id)
        report = FinishingReport(keepers=total)
        if progress is not None:
            progress(0, len(pending))
        for done, keeper in enumerate(pending, start=1):
            try:
                upscaled, captioned = self.finish_keeper(keeper)
            except (StorageError, PIL.UnidentifiedImageError) as exc:
                report.failures.append(f"image {keeper.image_id} ({keeper.storage_key}): {exc}")
            else:
                report.upscaled += upscaled
                report.captioned += captioned
            if progress is not None:
                progress(done, len(pending))
        report.filled = self.fill_empty_fields(run_id=run_id, review_item_id=review_item_id)
        return report

    def finish_keeper(self, keeper: PendingKeeper) -> tuple[bool, bool]:
        """Make what the keeper lacks; returns whether it was upscaled and captioned here
        (False where another worker got there first)."""
        source = PIL.Image.open(io.BytesIO(self.storage.get(keeper.storage_key)))
        source.load()
        upscaled = keeper.upscale and self._upscale(keeper, source)
        captioned = keeper.caption and self._caption(keeper, source)
        return upscaled, captioned

    def _upscale(self, keeper: PendingKeeper, source: PIL.Image.Image) -> bool:
        upscaler = self.upscaler
        assert upscaler is not None
        started = time.perf_counter()
        result = upscaler.upscale(source)
        data = _png(result, source, _upscale_note(keeper, upscaler))
        key = upscaled_key(keeper.storage_key, scale=upscaler.scale, model_sha256=upscaler.identity)
        row = {
            "image_id": keeper.image_id,
            "storage_key": key,
            "sha256": hashlib.sha256(data).hexdigest(),
            "width": result.width,
            "height": result.height,
            "bytes": len(data),
            "scale": upscaler.scale,
            "model_sha256": upscaler.identity,
            "model_name": upscaler.name[:500],
            "tile": upscaler.tile,
            "tile_overlap": upscaler.overlap,
            "versions": _versions("spandrel"),
            "seconds": time.perf_counter() - started,
        }
        with self.sessions() as session:
            statement = insert_ignoring_conflicts_stmt(session, UpscaledImage).values(row)
            inserted = session.execute(statement.returning(UpscaledImage.id)).first()
            if inserted is not None:
                # Inside the row's transaction: a failed write leaves no row behind.
                self.storage.put(key, data, content_type="image/png")
            session.commit()
        return inserted is not None

    def _caption(self, keeper: PendingKeeper, source: PIL.Image.Image) -> bool:
        captioner = self.captioner
        assert captioner is not None
        caption = captioner.caption(source)
        row = {
            "image_id": keeper.image_id,
            "caption": caption,
            "alt_text": alt_text(caption, self.settings.alt_text_max_chars),
            "captioner": captioner.identity,
            "captioner_name": captioner.name[:500],
            "prompt": captioner.prompt,
            "versions": _versions(),
        }
        with self.sessions() as session:
            statement = insert_ignoring_conflicts_stmt(session, ImageCaption).values(row)
            inserted = session.execute(statement.returning(ImageCaption.image_id)).first()
            session.commit()
        return inserted is not None

    # --- catalogue fields -------------------------------------------------------------------

    def fill_empty_fields(
        self, *, run_id: int | None = None, review_item_id: int | None = None
    ) -> int:
        """Fill the configured catalogue field of each item in scope whose own value is empty
        and that has no fill yet, from its first captioned keeper's alt text. Returns how many
        were filled."""
        name = self.settings.caption_fill_field
        if not name:
            return 0
        query = (
            select(
                ReviewItem.item_id,
                CatalogueItem.fields,
                ImageCaption.image_id,
                ImageCaption.alt_text,
            )
            .select_from(ImageReview)
            .join(ReviewItem, ReviewItem.id == ImageReview.review_item_id)
            .join(CatalogueItem, CatalogueItem.id == ReviewItem.item_id)
            .join(ImageCaption, ImageCaption.image_id == ImageReview.image_id)
            .where(
                ImageReview.decision == Decision.KEEP,
                ReviewItem.status == ReviewStatus.DONE,
                ImageCaption.alt_text != "",
                ~exists().where(
                    CatalogueFill.item_id == ReviewItem.item_id, CatalogueFill.field == name
                ),
            )
            .order_by(ReviewItem.item_id, ImageCaption.image_id)
        )
        if run_id is not None:
            query = query.where(ImageReview.run_id == run_id)
        if review_item_id is not None:
            query = query.where(ImageReview.review_item_id == review_item_id)
        with self.sessions() as session:
            fills: dict[int, dict[str, Any]] = {}
            for item_id, fields, image_id, text in session.execute(query):
                if item_id not in fills and is_empty(fields.get(name)):
                    fills[item_id] = {
                        "item_id": item_id,
                        "field": name,
                        "value": text,
                        "image_id": image_id,
                    }
            insert_ignoring_conflicts(session, CatalogueFill, list(fills.values()))
            session.commit()
        return len(fills)


def is_empty(value: object) -> bool:
    """A catalogue field with nothing in it: missing, null, or only white space."""
    return value is None or (isinstance(value, str) and not value.strip())


def _versions(*extra: str) -> dict[str, str]:
    versions = dict(library_versions())
    for name in extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _upscale_note(keeper: PendingKeeper, upscaler: Upscaler) -> str:
    return json.dumps(
        {
            "image_id": keeper.image_id,
            "source": keeper.storage_key,
            "scale": upscaler.scale,
            "upscaler": Path(upscaler.name).name,
            "upscaler_sha256": upscaler.identity,
        },
        sort_keys=True,
    )


def _png(image: PIL.Image.Image, source: PIL.Image.Image, note: str) -> bytes:
    """``image`` as PNG, with its source's text chunks (the generation parameters) and a
    chunk saying how it was made from it."""
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in source.info.items():
        if isinstance(key, str) and isinstance(value, str):
            info.add_itxt(key, value)
    info.add_itxt(UPSCALE_CHUNK, note)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
