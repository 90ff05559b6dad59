"""An item's candidates best first, near-duplicates grouped, and the run's cut line.

The order is the keeper model's predicted probability where the source has a model, else the
prior from the CLIP and aesthetic scores (pixelmill.keeper.prior_score); unscored images come
last in the order they were rendered. Images whose embeddings are closer than the duplicate
threshold, or whose files are identical, form one group shown as its best member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Image, Job
from db.ranking import ImageScore, KeeperModel, KeeperPrediction
from pixelmill.keeper import Candidate, embedding_from_bytes, prior_score


@dataclass(frozen=True)
class ScoredImage:
    image_id: int
    sha256: str
    embedding: bytes | None = None
    probability: float | None = None  # the keeper model's, when the source has one
    prior: float | None = None  # from the scores, before any model
    clip_score: float | None = None
    aesthetic_score: float | None = None
    image_similarity: float | None = None
    model_version: int | None = None  # the keeper model version behind ``probability``

    @property
    def rank_key(self) -> tuple[int, float]:
        if self.probability is not None:
            return (0, -self.probability)
        if self.prior is not None:
            return (1, -self.prior)
        return (2, 0.0)


@dataclass
class RankedGroup:
    """Near-duplicates of one item, best first: the grid shows ``members[0]``."""

    members: list[ScoredImage] = field(default_factory=list)

    @property
    def best(self) -> ScoredImage:
        return self.members[0]


def _groups(images: Sequence[ScoredImage], threshold: float) -> list[list[int]]:
    """Union-find over identical files and embeddings closer than ``threshold`` (cosine)."""
    parent = list(range(len(images)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    def join(a: int, b: int) -> None:
        parent[root(a)] = root(b)

    first_with_sha: dict[str, int] = {}
    for index, image in enumerate(images):
        if image.sha256 in first_with_sha:
            join(index, first_with_sha[image.sha256])
        first_with_sha.setdefault(image.sha256, index)
    embedded = [i for i, image in enumerate(images) if image.embedding is not None]
    if len(embedded) > 1:
        vectors = np.stack([embedding_from_bytes(images[i].embedding or b"") for i in embedded])
        similar = np.argwhere(np.triu(vectors @ vectors.T, k=1) > threshold)
        for a, b in similar:
            join(embedded[int(a)], embedded[int(b)])
    members: dict[int, list[int]] = {}
    for index in range(len(images)):
        members.setdefault(root(index), []).append(index)
    return list(members.values())


def rank_and_group(images: Sequence[ScoredImage], *, threshold: float) -> list[RankedGroup]:
    """``images`` (in render order) as groups, each best first, the groups best first; the
    sort is stable, so ties and unscored images keep their render order."""
    ranked = [
        RankedGroup(sorted((images[i] for i in group), key=lambda image: image.rank_key))
        for group in _groups(images, threshold)
    ]
    position = {image.image_id: index for index, image in enumerate(images)}
    return sorted(ranked, key=lambda group: (group.best.rank_key, position[group.best.image_id]))


def item_scores(session: Session, run_id: int, item_id: int) -> dict[int, ScoredImage]:
    """What ranking knows of each image of one item in one run."""
    rows = session.execute(
        select(
            Image.id,
            Image.sha256,
            Job.template,
            Job.variant,
            ImageScore.embedding,
            ImageScore.clip_score,
            ImageScore.aesthetic_score,
            ImageScore.image_similarity,
            KeeperPrediction.probability,
            KeeperModel.version,
        )
        .join(Job, Job.id == Image.job_id)
        .outerjoin(ImageScore, ImageScore.image_id == Image.id)
        .outerjoin(KeeperPrediction, KeeperPrediction.image_id == Image.id)
        .outerjoin(KeeperModel, KeeperModel.id == KeeperPrediction.model_id)
        .where(Job.run_id == run_id, Job.item_id == item_id)
    ).all()
    return {int(row[0]): _scored(*tuple(row)) for row in rows}


def _optional(value: float | None) -> float | None:
    return None if value is None else float(value)


def _scored(
    image_id: int,
    sha: str,
    template: str,
    variant: str,
    embedding: bytes | None,
    clip: float | None,
    aesthetic: float | None,
    similarity: float | None,
    probability: float | None,
    version: int | None,
) -> ScoredImage:
    prior = None
    if clip is not None and embedding is not None:
        candidate = Candidate(bytes(embedding), clip, aesthetic, similarity, template, variant)
        prior = prior_score(candidate)
    return ScoredImage(
        image_id=int(image_id),
        sha256=str(sha),
        embedding=None if embedding is None else bytes(embedding),
        probability=_optional(probability),
        prior=prior,
        clip_score=_optional(clip),
        aesthetic_score=_optional(aesthetic),
        image_similarity=_optional(similarity),
        model_version=None if version is None else int(version),
    )


def cut_for(probabilities: Sequence[float]) -> float | None:
    """The run's cut: its mean predicted keep probability, i.e. the chance that a look at a
    random candidate finds a keeper. An image above it is a better use of a reviewer's second
    than a random one, one below it a worse one; with calibrated probabilities this holds for
    every item alike, however many keepers it has. (A cut that keeps 95% of the *expected*
    keepers would be pulled deep into the grid by what reviewers keep at random, which no
    ranking can find.) None without predictions."""
    if not probabilities:
        return None
    return float(np.mean(np.asarray(probabilities, dtype=np.float64)))


def run_cut(session: Session, run_id: int) -> float | None:
    """The run's one cut line, from all its images' predictions: :func:`cut_for` (their mean),
    computed by the database so that a large run's probabilities are not fetched."""
    statement = (
        select(func.avg(KeeperPrediction.probability))
        .join(Image, Image.id == KeeperPrediction.image_id)
        .join(Job, Job.id == Image.job_id)
        .where(Job.run_id == run_id)
    )
    mean = session.scalar(statement)
    return None if mean is None else float(mean)


def predicted_count(session: Session, run_id: int) -> int:
    statement = (
        select(func.count())
        .select_from(KeeperPrediction)
        .join(Image, Image.id == KeeperPrediction.image_id)
        .join(Job, Job.id == Image.job_id)
        .where(Job.run_id == run_id)
    )
    return int(session.scalar(statement) or 0)
