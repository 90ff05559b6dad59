"""What the machine knows about each image: its scores, the keeper models learned from
reviewers' decisions, their predictions, and the rejections a model made on its own.

Nothing here replaces a person's decision (``image_reviews``): a prediction orders the grid,
and an automatic rejection is a separate row a person can undo, so what people decided and
what a model guessed are never mixed up in stats or exports.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.models import Base, JSONType, utcnow


class ImageScore(Base):
    """One image's scores by one scorer (a CLIP model and an aesthetic head).

    ``embedding`` is the image's CLIP embedding, L2-normalised, as little-endian float16:
    768 dimensions (ViT-L/14) are 1,536 bytes. Measured on Postgres (10,000 rows,
    pg_total_relation_size after VACUUM): 2,086 bytes a row with its indexes, so a million
    images take about 2.1 GB (four 1.7 KB rows fit an 8 KB page).
    """

    __tablename__ = "image_scores"
    __table_args__ = (
        CheckConstraint("clip_score >= -1 AND clip_score <= 1", name="clip_score_cosine"),
        CheckConstraint(
            "image_similarity IS NULL OR (image_similarity >= -1 AND image_similarity <= 1)",
            name="image_similarity_cosine",
        ),
    )

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    # sha256 over the scorer's weight files: rescoring with the same scorer is a no-op.
    scorer: Mapped[str] = mapped_column(String(64), index=True)
    # Cosine similarity of the prompt's and the image's CLIP embeddings.
    clip_score: Mapped[float] = mapped_column(Float)
    # The aesthetic head's rating (LAION's scale: about 1 to 10); None without a head.
    aesthetic_score: Mapped[float | None] = mapped_column(Float)
    # Cosine similarity to the catalogue photo the job started from (img2img, inpaint,
    # ControlNet); None for txt2img.
    image_similarity: Mapped[float | None] = mapped_column(Float)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KeeperModel(Base):
    """One trained version of a catalogue source's keeper model.

    ``parameters`` holds everything prediction needs (feature layout, coefficients and the
    calibration), as JSON rather than a pickle: loading it runs no code.
    """

    __tablename__ = "keeper_models"
    __table_args__ = (
        UniqueConstraint("source", "version"),
        CheckConstraint("trained_on > 0", name="trained_on_positive"),
        CheckConstraint("held_out >= 0", name="held_out_non_negative"),
        CheckConstraint("auc IS NULL OR (auc >= 0 AND auc <= 1)", name="auc_range"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    # The scorer whose embeddings the model reads: predictions need the same one.
    scorer: Mapped[str] = mapped_column(String(64))
    trained_on: Mapped[int] = mapped_column(Integer)
    held_out: Mapped[int] = mapped_column(Integer)
    # Area under the ROC curve on the held-out decisions; None when they hold one class only.
    auc: Mapped[float | None] = mapped_column(Float)
    # How many decisions on the source existed when it was trained (retraining counts on).
    decisions_seen: Mapped[int] = mapped_column(Integer)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KeeperPrediction(Base):
    """The latest predicted keep probability of an image, and the model version behind it."""

    __tablename__ = "keeper_predictions"
    __table_args__ = (
        CheckConstraint("probability >= 0 AND probability <= 1", name="probability_range"),
    )

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[int] = mapped_column(
        ForeignKey("keeper_models.id", ondelete="CASCADE"), index=True
    )
    probability: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AutoReject(Base):
    """A rejection made by a keeper model below the configured confidence, never by a person.

    It hides the image from the grid's default view and counts apart in stats; a person who
    undoes it (``undone_by``) or decides the image themselves overrides it. Nothing is deleted.
    """

    __tablename__ = "auto_rejects"
    __table_args__ = (
        CheckConstraint("probability >= 0 AND probability <= 1", name="probability_range"),
        CheckConstraint("(undone_by IS NULL) = (undone_at IS NULL)", name="undo_has_time"),
        Index(None, "run_id", "undone_at"),
    )

    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    review_item_id: Mapped[int] = mapped_column(
        ForeignKey("review_items.id", ondelete="CASCADE"), index=True
    )
    model_id: Mapped[int] = mapped_column(ForeignKey("keeper_models.id", ondelete="CASCADE"))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    undone_by: Mapped[int | None] = mapped_column(ForeignKey("reviewers.id"))
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def latest_keeper_model(
    session: Session, source: str, scorer: str | None = None
) -> KeeperModel | None:
    """The source's newest keeper model; with ``scorer``, the newest trained on that scorer's
    embeddings (an older model of this scorer still reads them; a newer one of another
    scorer cannot). Review ranks with it and the worker stops sweeps early with it."""
    statement = select(KeeperModel).where(KeeperModel.source == source)
    if scorer is not None:
        statement = statement.where(KeeperModel.scorer == scorer)
    return session.scalars(statement.order_by(KeeperModel.version.desc()).limit(1)).first()
