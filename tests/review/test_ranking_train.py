"""The keeper model learns a planted signal from recorded decisions, on Postgres.

Each item's candidates carry an embedding in which keepers lean along one hidden direction;
decisions follow it with 10% label noise. A model trained on those decisions must rank
held-out images by it, store its version with its sizes and AUC, and predict every image.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Decision, ImageReview, ReviewItem
from db.ranking import ImageScore, KeeperModel, KeeperPrediction
from pixelmill.keeper import embedding_to_bytes
from pixelmill.settings import get_settings
from review.accounts import add_reviewer
from review.ranking.predict import predict_run
from review.ranking.retrain import due_for_training, retrain_due
from review.ranking.train import train_keeper_model
from tests.factories import image_row, make_item, make_job, make_run

DIMENSIONS = 16
SCORER = "s" * 64


def plant_decisions(
    session: Session, *, items: int, per_item: int, noise: float, seed: int = 0
) -> tuple[int, dict[int, bool]]:
    """A run whose images' embeddings carry the planted signal; decisions on all of them.
    Returns the run id and each image's true keeper status."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(DIMENSIONS)
    direction[0] = 1.0
    run = make_run(session, source="catalogue.csv")
    reviewer = add_reviewer(session, f"r{seed}", "correct horse battery staple", admin=False)
    truth: dict[int, bool] = {}
    for _ in range(items):
        item = make_item(session, source="catalogue.csv")
        job = make_job(session, run, item=item, seeds=list(range(per_item)), commit=False)
        review_item = ReviewItem(run_id=run.id, item_id=item.id)
        session.add(review_item)
        session.flush()
        for seed_value in job.seeds:
            keeper = bool(rng.random() < 0.2)
            vector = rng.normal(size=DIMENSIONS) + (2.5 if keeper else 0.0) * direction
            image = image_row(job.id, seed_value)
            session.add(image)
            session.flush()
            session.add(
                ImageScore(
                    image_id=image.id,
                    scorer=SCORER,
                    clip_score=float(rng.uniform(0.1, 0.3)),
                    aesthetic_score=None,
                    image_similarity=None,
                    embedding=embedding_to_bytes(vector),
                )
            )
            decided = keeper if rng.random() >= noise else not keeper
            session.add(
                ImageReview(
                    image_id=image.id,
                    run_id=run.id,
                    review_item_id=review_item.id,
                    decision=Decision.KEEP if decided else Decision.REJECT,
                    reviewer_id=reviewer.id,
                )
            )
            truth[image.id] = keeper
    session.flush()
    return run.id, truth


def test_model_learns_planted_signal_with_label_noise(db_session: Session) -> None:
    run_id, truth = plant_decisions(db_session, items=60, per_item=8, noise=0.1)

    outcome = train_keeper_model(db_session, "catalogue.csv", min_decisions=200)

    model = outcome.model
    assert model is not None, outcome.reason
    assert (model.version, model.scorer) == (1, SCORER)
    assert model.trained_on + model.held_out == len(truth)
    assert model.held_out > 0
    assert model.auc is not None and model.auc > 0.85
    assert predict_run(db_session, run_id) == len(truth)
    rows = db_session.execute(select(KeeperPrediction.image_id, KeeperPrediction.probability))
    probabilities = {int(image_id): float(p) for image_id, p in rows}
    kept = [p for image_id, p in probabilities.items() if truth[image_id]]
    rejected = [p for image_id, p in probabilities.items() if not truth[image_id]]
    assert np.mean(kept) > 0.5 > np.mean(rejected)


def test_no_model_before_enough_decisions_or_with_one_class(db_session: Session) -> None:
    plant_decisions(db_session, items=5, per_item=4, noise=0.0)

    outcome = train_keeper_model(db_session, "catalogue.csv", min_decisions=200)

    assert outcome.model is None
    assert "200 needed" in outcome.reason
    assert db_session.scalar(select(func.count()).select_from(KeeperModel)) == 0


@pytest.mark.parametrize("new_decisions", [0, 30])
def test_retraining_waits_for_enough_new_decisions(db_session: Session, new_decisions: int) -> None:
    settings = get_settings(keeper_min_decisions=100, keeper_retrain_every=30)
    plant_decisions(db_session, items=20, per_item=8, noise=0.1)
    assert due_for_training(db_session, "catalogue.csv", settings)
    [first] = retrain_due(db_session, settings)
    assert first.model is not None and first.model.version == 1
    assert not due_for_training(db_session, "catalogue.csv", settings)

    if new_decisions:
        plant_decisions(db_session, items=new_decisions // 6 + 1, per_item=6, noise=0.1, seed=1)
    outcomes = retrain_due(db_session, settings)

    assert [o.model.version for o in outcomes if o.model] == ([2] if new_decisions else [])
