"""The decisions a keeper model learns from: people's keeps and rejects on scored images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Decision, Image, ImageReview, Job
from db.ranking import ImageScore
from pixelmill.keeper import Candidate


@dataclass(frozen=True)
class Example:
    image_id: int
    item_id: int  # held-out splits keep an item's images together
    candidate: Candidate
    kept: bool


def decision_count(session: Session, source: str) -> int:
    """People's decisions on the source's images (scored or not)."""
    statement = (
        select(func.count())
        .select_from(ImageReview)
        .join(Image, Image.id == ImageReview.image_id)
        .join(Job, Job.id == Image.job_id)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(CatalogueItem.source == source)
    )
    return int(session.scalar(statement) or 0)


def sources_with_decisions(session: Session) -> list[str]:
    statement = (
        select(CatalogueItem.source)
        .join(Job, Job.item_id == CatalogueItem.id)
        .join(Image, Image.job_id == Job.id)
        .join(ImageReview, ImageReview.image_id == Image.id)
        .distinct()
        .order_by(CatalogueItem.source)
    )
    return list(session.scalars(statement))


def scored_candidates_query(source: str, scorer: str) -> Select:
    """Rows of (image id, item id, template, variant, score columns) of one source's images
    scored by ``scorer``."""
    return (
        select(
            Image.id,
            Job.item_id,
            Job.template,
            Job.variant,
            ImageScore.embedding,
            ImageScore.clip_score,
            ImageScore.aesthetic_score,
            ImageScore.image_similarity,
        )
        .join(Job, Job.id == Image.job_id)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .join(ImageScore, ImageScore.image_id == Image.id)
        .where(CatalogueItem.source == source, ImageScore.scorer == scorer)
    )


def candidate_of(row: Sequence[Any]) -> Candidate:
    _, _, template, variant, embedding, clip, aesthetic, similarity = row
    return Candidate(
        embedding=bytes(embedding),
        clip_score=float(clip),
        aesthetic_score=None if aesthetic is None else float(aesthetic),
        image_similarity=None if similarity is None else float(similarity),
        template=str(template),
        variant=str(variant),
    )


def training_examples(session: Session, source: str, scorer: str) -> list[Example]:
    """Every scored image of ``source`` a person decided, with that decision."""
    statement = (
        scored_candidates_query(source, scorer)
        .add_columns(ImageReview.decision)
        .join(ImageReview, ImageReview.image_id == Image.id)
        .order_by(Image.id)
    )
    return [
        Example(
            image_id=int(row[0]),
            item_id=int(row[1]),
            candidate=candidate_of(row[:8]),
            kept=row[8] == Decision.KEEP,
        )
        for row in session.execute(statement)
    ]


def main_scorer(session: Session, source: str) -> str | None:
    """The scorer most of the source's decided images were scored by."""
    statement = (
        select(ImageScore.scorer, func.count())
        .join(Image, Image.id == ImageScore.image_id)
        .join(ImageReview, ImageReview.image_id == Image.id)
        .join(Job, Job.id == Image.job_id)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(CatalogueItem.source == source)
        .group_by(ImageScore.scorer)
        .order_by(func.count().desc(), ImageScore.scorer)
        .limit(1)
    )
    row = session.execute(statement).first()
    return None if row is None else str(row[0])
