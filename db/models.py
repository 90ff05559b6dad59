"""SQLAlchemy 2 models. Rules live in the schema (CHECK and UNIQUE constraints), so every
writer, not only this code, is held to them."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, compact), plain JSON on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RunStatus(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    FINISHED = "finished"


class JobStatus(enum.StrEnum):
    PENDING = "pending"  # written by the producer, not yet published
    QUEUED = "queued"  # its id is on the broker
    RUNNING = "running"  # claimed by a worker, lease in lease_expires_at
    DONE = "done"  # every seed has a durable image row
    FAILED = "failed"  # a deterministic error (bad input, missing model); error says why
    DEAD = "dead"  # out of attempts (max_attempts); error holds the last attempt's error
    BLOCKED = "blocked"  # refused by the prompt blocklist, never rendered
    CANCELLED = "cancelled"  # its run was cancelled before it started


# Jobs not yet ended: a run with none of these left has nothing more to do.
OPEN_JOB_STATUSES = (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING)


class JobKind(enum.StrEnum):
    """What a job starts from: a prompt alone, or a catalogue image as well."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"  # the input image, re-noised by `strength`
    INPAINT = "inpaint"  # the input image's unmasked pixels kept, the masked area generated
    CONTROLNET = "controlnet"  # a control image (canny edges or supplied) steers a ControlNet


class SafetyStatus(enum.StrEnum):
    UNCHECKED = "unchecked"  # the model has no safety checker (or it is disabled)
    SAFE = "safe"
    FLAGGED = "flagged"


def _in(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


def _timestamp(*, nullable: bool = True) -> Any:
    return mapped_column(DateTime(timezone=True), nullable=nullable)


class Run(Base):
    """One nightly batch."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_in("status", RunStatus), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.ACTIVE)
    # Higher first: the dispatcher publishes pending jobs of higher-priority runs first.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = _timestamp()

    jobs: Mapped[list[Job]] = relationship(back_populates="run")


class CatalogueItem(Base):
    """One version of a catalogue row, independent of runs.

    Rows are immutable: when an item's fields change, a new version with a new content hash is
    stored, so jobs rendered from the old fields keep pointing at what they were made from.
    """

    __tablename__ = "catalogue_items"
    __table_args__ = (UniqueConstraint("source", "external_key", "content_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(200))
    external_key: Mapped[str] = mapped_column(String(200))
    fields: Mapped[dict[str, Any]] = mapped_column(JSONType)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """One prompt rendered with a sweep of seeds."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JobStatus), name="status"),
        CheckConstraint("steps >= 1", name="steps_positive"),
        CheckConstraint("guidance >= 0", name="guidance_non_negative"),
        CheckConstraint(
            "width > 0 AND height > 0 AND width % 8 = 0 AND height % 8 = 0", name="size"
        ),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        CheckConstraint(_in("kind", JobKind), name="kind"),
        # Every kind but txt2img starts from a staged catalogue image.
        CheckConstraint("kind = 'txt2img' OR input_image IS NOT NULL", name="kind_has_image"),
        CheckConstraint("kind = 'inpaint' OR mask_image IS NULL", name="mask_only_inpaint"),
        Index(None, "run_id", "status"),
        # The dispatcher's scans: pending jobs in order, and queued jobs by age.
        Index(None, "status", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("catalogue_items.id"), index=True)
    template: Mapped[str] = mapped_column(String(200))
    # The template variant's label ("" when the template has none): seeds and stats use it.
    variant: Mapped[str] = mapped_column(String(500), default="", server_default="")
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str] = mapped_column(String(500))
    scheduler: Mapped[str | None] = mapped_column(String(50))
    steps: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seeds: Mapped[list[int]] = mapped_column(JSONType)
    # Seeds of the sweep left unrendered because its item already had enough likely keepers
    # (early stop); None when every seed was rendered.
    skipped_seeds: Mapped[list[int] | None] = mapped_column(JSONType)
    kind: Mapped[str] = mapped_column(
        String(16), default=JobKind.TXT2IMG, server_default=JobKind.TXT2IMG.value
    )
    # The staged catalogue image (and mask image, for an inpaint job with a mask column) this
    # job starts from, by content hash; None for txt2img.
    input_image: Mapped[str | None] = mapped_column(ForeignKey("input_images.sha256"))
    mask_image: Mapped[str | None] = mapped_column(ForeignKey("input_images.sha256"))
    # The kind's parameters and the adapters, as the template gave them (None: plain txt2img).
    # See producer.conditioning.JobOptions for the keys; the dedupe key covers all of it.
    options: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(
        String(16), default=JobStatus.PENDING, server_default=JobStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Attempts that ended because a service (database, broker, storage) was unreachable:
    # retried like the others but not counted against max_attempts.
    outages: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    # Hash of everything that determines the pixels: the same key is never rendered twice.
    dedupe_key: Mapped[str] = mapped_column(String(64), unique=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    queued_at: Mapped[datetime | None] = _timestamp()
    # A pending job given back after a failed attempt is not published before this
    # (exponential backoff with jitter); None: at once.
    retry_at: Mapped[datetime | None] = _timestamp()
    started_at: Mapped[datetime | None] = _timestamp()
    lease_expires_at: Mapped[datetime | None] = _timestamp()
    finished_at: Mapped[datetime | None] = _timestamp()

    run: Mapped[Run] = relationship(back_populates="jobs")
    item: Mapped[CatalogueItem] = relationship()
    images: Mapped[list[Image]] = relationship(back_populates="job")


class InputImage(Base):
    """A catalogue image staged into storage once, under its content hash.

    Workers read input images only from storage (never the catalogue's URL), so a render does
    not depend on a remote server being up, and a re-run does not fetch them again.
    """

    __tablename__ = "input_images"
    __table_args__ = (
        CheckConstraint("width > 0 AND height > 0", name="size"),
        CheckConstraint("bytes > 0", name="bytes_positive"),
    )

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    storage_key: Mapped[str] = mapped_column(String(500))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    # PIL's mode of the decoded image ("RGB", "RGBA", "L", ...): RGBA carries an alpha mask.
    mode: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InputSource(Base):
    """Where an input image came from (a path, s3:// or http(s):// address) and what it held
    when it was fetched: a re-run finds its images here instead of fetching them again."""

    __tablename__ = "input_sources"

    source: Mapped[str] = mapped_column(String(2000), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("input_images.sha256"), index=True)
    fetched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    """One rendered seed of a job, stored in object storage."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("job_id", "seed"),
        CheckConstraint(_in("safety", SafetyStatus), name="safety"),
        CheckConstraint("bytes > 0", name="bytes_positive"),
        # Only a flagged image may have no object (PIXELMILL_FLAGGED_IMAGES=drop): every other
        # row points at a stored object.
        CheckConstraint("storage_key <> '' OR safety = 'flagged'", name="stored_unless_flagged"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seed: Mapped[int] = mapped_column(BigInteger)
    # "" for a flagged image that was dropped (not stored); flagged images that are kept live
    # under the "quarantine/" prefix.
    storage_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)
    safety: Mapped[str] = mapped_column(String(16))
    # The checker's score where it gives one (the diffusers checker gives only a verdict).
    safety_score: Mapped[float | None] = mapped_column(Float)
    # A small JPEG/PNG preview for review grids, written by the worker beside the image; None
    # for images stored before thumbnails existed and for dropped flagged images.
    thumbnail_key: Mapped[str | None] = mapped_column(String(500))
    # The model's identity: sha256 over its weight files (worker.models.model_identity), and the
    # library versions that rendered it, so an image can be reproduced or explained later.
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    versions: Mapped[dict[str, str] | None] = mapped_column(JSONType)
    # The seeds rendered in the same pipeline call, in batch order (this image's among them):
    # batched kernels round differently from a lone render, so reproducing an image exactly
    # means rendering its batch again. None for images rendered before this was recorded.
    batch_seeds: Mapped[list[int] | None] = mapped_column(JSONType)
    render_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images")


# --- review (review/) ----------------------------------------------------------------------


class ReviewStatus(enum.StrEnum):
    OPEN = "open"  # waiting for a reviewer (or claimed: see claimed_by / claim_expires_at)
    REROLLING = "rerolling"  # "none of these": more seeds are rendering; reopens when done
    DONE = "done"  # submitted


class Decision(enum.StrEnum):
    KEEP = "keep"
    REJECT = "reject"


class ReviewAction(enum.StrEnum):
    KEEP = "keep"
    REJECT = "reject"
    UNDO = "undo"
    SUBMIT = "submit"
    REROLL = "reroll"


class Reviewer(Base):
    """A person who reviews images; admins may also export and read stats."""

    __tablename__ = "reviewers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # argon2id, in the PHC string format (parameters and salt included).
    password_hash: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReviewItem(Base):
    """One catalogue item in one run: the unit of review, and the queue's claim row.

    Created when the item's jobs in the run have all ended (review.queue.sync_queue). A
    reviewer claims the lowest open row whose claim is free or expired (FOR UPDATE SKIP LOCKED
    on Postgres); the (run_id, status, id) index makes that an index range scan that stops at
    the first free row, whatever the size of the run.
    """

    __tablename__ = "review_items"
    __table_args__ = (
        UniqueConstraint("run_id", "item_id"),
        CheckConstraint(_in("status", ReviewStatus), name="status"),
        CheckConstraint("rerolls >= 0", name="rerolls_non_negative"),
        CheckConstraint(
            "(claimed_by IS NULL) = (claim_expires_at IS NULL)", name="claim_has_expiry"
        ),
        Index(None, "run_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("catalogue_items.id"))
    status: Mapped[str] = mapped_column(
        String(16), default=ReviewStatus.OPEN, server_default=ReviewStatus.OPEN.value
    )
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("reviewers.id"), index=True)
    claim_expires_at: Mapped[datetime | None] = _timestamp()
    # How many times "none of these" queued more seeds for this item.
    rerolls: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    submitted_by: Mapped[int | None] = mapped_column(ForeignKey("reviewers.id"))
    submitted_at: Mapped[datetime | None] = _timestamp()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    item: Mapped[CatalogueItem] = relationship()


class ImageReview(Base):
    """The current decision on one image (undo deletes or restores it)."""

    __tablename__ = "image_reviews"
    __table_args__ = (
        CheckConstraint(_in("decision", Decision), name="decision"),
        # Export and stats: the keepers (or all decisions) of a run.
        Index(None, "run_id", "decision"),
    )

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    review_item_id: Mapped[int] = mapped_column(
        ForeignKey("review_items.id", ondelete="CASCADE"), index=True
    )
    decision: Mapped[str] = mapped_column(String(16))
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReviewEvent(Base):
    """Append-only log of every review action, with who and when: the audit trail, what undo
    walks back, and what throughput is measured from."""

    __tablename__ = "review_events"
    __table_args__ = (
        CheckConstraint(_in("action", ReviewAction), name="action"),
        CheckConstraint(
            "previous IS NULL OR " + _in("previous", Decision), name="previous_decision"
        ),
        Index(None, "review_item_id", "id"),
        Index(None, "run_id", "reviewer_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    review_item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id", ondelete="CASCADE"))
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"))
    action: Mapped[str] = mapped_column(String(16))
    # keep/reject: the image's decision before this event (None: undecided), which undo restores.
    previous: Mapped[str | None] = mapped_column(String(16))
    # Set on a keep/reject event once undo has walked it back.
    undone: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReviewSync(Base):
    """When review.queue.sync_queue last looked at a run's jobs. A finished run whose
    finished_at is unchanged since has no new items: its (large) scan is skipped."""

    __tablename__ = "review_sync"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    run_finished_at: Mapped[datetime | None] = _timestamp()
    synced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
