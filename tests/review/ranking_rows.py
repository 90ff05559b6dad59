"""Planted ranking signals: scores, a keeper model and its predictions written straight into
the database for images a test made, so that the order the app must show is known."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from db.models import Image
from db.ranking import ImageScore, KeeperModel, KeeperPrediction
from pixelmill.keeper import embedding_to_bytes

SCORER = "c" * 64
DIMENSIONS = 8


def axis(index: int) -> list[float]:
    """A unit vector of its own: images far from every other (not near-duplicates)."""
    vector = [0.0] * DIMENSIONS
    vector[index % DIMENSIONS] = 1.0
    return vector


def near(vector: list[float]) -> list[float]:
    """A vector at cosine ~0.999 to ``vector``: a near-duplicate."""
    return [value + (0.03 if value == 0.0 else 0.0) for value in vector]


def add_scores(
    session: Session,
    images: Sequence[Image],
    clip: Sequence[float],
    *,
    vectors: Sequence[list[float]] | None = None,
    aesthetic: Sequence[float | None] | None = None,
) -> None:
    """Scores for ``images`` (one CLIP score each; embeddings far apart unless given)."""
    for index, image in enumerate(images):
        session.add(
            ImageScore(
                image_id=image.id,
                scorer=SCORER,
                clip_score=clip[index],
                aesthetic_score=None if aesthetic is None else aesthetic[index],
                image_similarity=None,
                embedding=embedding_to_bytes(vectors[index] if vectors else axis(index)),
            )
        )
    session.commit()


def add_model(session: Session, source: str = "test.csv", version: int = 1) -> KeeperModel:
    model = KeeperModel(
        source=source,
        version=version,
        scorer=SCORER,
        trained_on=100,
        held_out=20,
        auc=0.9,
        decisions_seen=120,
        parameters={"planted": True},
    )
    session.add(model)
    session.commit()
    return model


def add_predictions(
    session: Session, model: KeeperModel, images: Sequence[Image], probabilities: Sequence[float]
) -> None:
    for image, probability in zip(images, probabilities, strict=True):
        session.add(KeeperPrediction(image_id=image.id, model_id=model.id, probability=probability))
    session.commit()
