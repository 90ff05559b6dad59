"""What finishing made from each kept image: its upscaled copies, its caption and alt text,
and the catalogue fields its caption filled.

Every row names what it was made from (the image, the upscaler's or captioner's weights), so
a derivative can be traced back and made again; none replaces what it came from. Catalogue
items are immutable versions, so a filled field is a row beside the item, never a change to
its ``fields``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    ScalarSelect,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import (
    Base,
    Decision,
    Image,
    ImageReview,
    JSONType,
    ReviewItem,
    ReviewStatus,
    utcnow,
)


class UpscaledImage(Base):
    """One upscaled copy of a kept image, stored under the approved prefix."""

    __tablename__ = "upscaled_images"
    __table_args__ = (
        # One copy per image, scale and upscaler: finishing again makes nothing new.
        UniqueConstraint("image_id", "scale", "model_sha256"),
        CheckConstraint("scale IN (2, 4)", name="scale"),
        CheckConstraint("width > 0 AND height > 0", name="size"),
        CheckConstraint("bytes > 0", name="bytes_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    storage_key: Mapped[str] = mapped_column(String(500), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)
    scale: Mapped[int] = mapped_column(Integer)
    # The upscaler: sha256 of its model file, and the file it was read from.
    model_sha256: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(500))
    # The tiling (input pixels a side, and the context around each tile): pixels along tile
    # seams depend on it, slightly.
    tile: Mapped[int] = mapped_column(Integer)
    tile_overlap: Mapped[int] = mapped_column(Integer)
    versions: Mapped[dict[str, str]] = mapped_column(JSONType)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageCaption(Base):
    """A kept image's caption and alt text, by a BLIP captioner."""

    __tablename__ = "image_captions"

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    caption: Mapped[str] = mapped_column(Text)
    alt_text: Mapped[str] = mapped_column(Text)
    # The captioner: sha256 over its weight files, and the name it was loaded by.
    captioner: Mapped[str] = mapped_column(String(64))
    captioner_name: Mapped[str] = mapped_column(String(500))
    # The prompt the caption was started with ("" for none); not part of the caption.
    prompt: Mapped[str] = mapped_column(Text, default="", server_default="")
    versions: Mapped[dict[str, str]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CatalogueFill(Base):
    """A value for a catalogue item's empty field, from the caption of one of its keepers:
    what the field says wherever a finished item is exported."""

    __tablename__ = "catalogue_fills"

    item_id: Mapped[int] = mapped_column(ForeignKey("catalogue_items.id"), primary_key=True)
    field: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def latest_upscaled_key(image_id_column: Any) -> ScalarSelect[str]:
    """A scalar subquery: the storage key of the image's latest upscaled copy (None if it has
    none), for a select over images."""
    return (
        select(UpscaledImage.storage_key)
        .where(UpscaledImage.image_id == image_id_column)
        .order_by(UpscaledImage.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def alt_texts(session: Session, image_ids: Iterable[int]) -> dict[int, str]:
    """Each captioned image's alt text, by image id (images without a caption are left out)."""
    ids = list(image_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(ImageCaption.image_id, ImageCaption.alt_text).where(ImageCaption.image_id.in_(ids))
    )
    return {image_id: alt_text for image_id, alt_text in rows}


def upscaled_keys(session: Session, image_ids: Iterable[int]) -> dict[int, str]:
    """Each image's latest upscaled copy's storage key, by image id (none: left out)."""
    ids = list(image_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(UpscaledImage.image_id, UpscaledImage.storage_key)
        .where(UpscaledImage.image_id.in_(ids))
        .order_by(UpscaledImage.id)
    )
    return {image_id: key for image_id, key in rows}  # later rows win: the latest copy


def filled_fields(session: Session, item_ids: Iterable[int]) -> dict[int, dict[str, str]]:
    """The filled fields of each item, by item id (items with none are left out)."""
    ids = sorted(set(item_ids))
    if not ids:
        return {}
    found: dict[int, dict[str, str]] = {}
    rows = session.execute(
        select(CatalogueFill.item_id, CatalogueFill.field, CatalogueFill.value)
        .where(CatalogueFill.item_id.in_(ids))
        .order_by(CatalogueFill.item_id, CatalogueFill.field)
    )
    for item_id, field, value in rows:
        found.setdefault(item_id, {})[field] = value
    return found


def run_filled_fields(session: Session, run_id: int) -> dict[int, dict[str, str]]:
    """The filled fields of the items reviewed in the run, by item id."""
    found: dict[int, dict[str, str]] = {}
    rows = session.execute(
        select(CatalogueFill.item_id, CatalogueFill.field, CatalogueFill.value)
        .join(ReviewItem, ReviewItem.item_id == CatalogueFill.item_id)
        .where(ReviewItem.run_id == run_id)
        .order_by(CatalogueFill.item_id, CatalogueFill.field)
    )
    for item_id, field, value in rows:
        found.setdefault(item_id, {})[field] = value
    return found


def submitted_keeper() -> list[ColumnElement[bool]]:
    """What makes a kept image one to finish and export, in a query joining ImageReview, its
    ReviewItem and its Image: kept, its item submitted, and a stored file (a flagged image
    that was not stored has none: decide() refuses to keep one, and this guards decisions
    recorded before it did)."""
    return [
        ImageReview.decision == Decision.KEEP,
        ReviewItem.status == ReviewStatus.DONE,
        Image.storage_key != "",
    ]
