"""Keep probabilities for rendered images, by the latest keeper model of their source."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Image, Job
from db.ranking import KeeperModel, KeeperPrediction, latest_keeper_model
from db.upsert import upsert_many
from pixelmill.keeper import KeeperPredictor
from review.ranking.decisions import candidate_of, scored_candidates_query

BATCH = 2000


def run_sources(session: Session, run_id: int) -> list[str]:
    statement = (
        select(CatalogueItem.source)
        .join(Job, Job.item_id == CatalogueItem.id)
        .where(Job.run_id == run_id)
        .distinct()
    )
    return list(session.scalars(statement))


def predict_source(session: Session, model: KeeperModel, run_id: int | None = None) -> int:
    """Record ``model``'s probability for every image of its source (or of one run) scored
    by its scorer; returns how many. Uncommitted."""
    predictor = KeeperPredictor(model.parameters)
    statement = scored_candidates_query(model.source, model.scorer).order_by(Image.id)
    if run_id is not None:
        statement = statement.where(Job.run_id == run_id)
    rows = session.execute(statement).all()
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        probabilities = predictor.predict([candidate_of(row) for row in chunk])
        values = [
            {"image_id": int(row[0]), "model_id": model.id, "probability": probability}
            for row, probability in zip(chunk, probabilities, strict=True)
        ]
        upsert_many(session, KeeperPrediction, values, ["image_id"])
    return len(rows)


def predict_run(session: Session, run_id: int) -> int:
    """Predict every scored image of a run with its source's latest model (where one exists)."""
    predicted = 0
    for source in run_sources(session, run_id):
        model = latest_keeper_model(session, source)
        if model is not None:
            predicted += predict_source(session, model, run_id)
    return predicted
