"""The keeper model's NumPy prediction is the logistic regression it was trained as."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pixelmill.keeper import (
    Candidate,
    KeeperModelError,
    KeeperPredictor,
    embedding_from_bytes,
    embedding_to_bytes,
    feature_matrix,
    parameters,
)


def _candidates(rng: np.random.Generator, count: int) -> list[Candidate]:
    return [
        Candidate(
            embedding=embedding_to_bytes(rng.normal(size=8)),
            clip_score=float(rng.uniform(0, 0.4)),
            aesthetic_score=float(rng.uniform(1, 10)) if index % 3 else None,
            image_similarity=float(rng.uniform(0, 1)) if index % 2 else None,
            template=f"t{index % 2}",
            variant="",
        )
        for index in range(count)
    ]


def test_embedding_bytes_are_normalised_float16() -> None:
    data = embedding_to_bytes([3.0, 4.0])
    assert len(data) == 4
    assert embedding_from_bytes(data) == pytest.approx([0.6, 0.8], abs=1e-3)


def test_prediction_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    candidates = _candidates(rng, 200)
    categories = ["t0\x1f", "t1\x1f"]
    features = feature_matrix(candidates, categories)
    labels = (features[:, 0] + features[:, 8] > 0.1).astype(int)
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    model = LogisticRegression().fit((features - mean) / scale, labels)
    predictor = KeeperPredictor(
        parameters(
            categories=categories,
            mean=mean,
            scale=scale,
            coef=model.coef_[0],
            intercept=model.intercept_[0],
            calibration_slope=1.0,
            calibration_intercept=0.0,
        )
    )
    expected = model.predict_proba((features - mean) / scale)[:, 1]
    assert predictor.predict(candidates) == pytest.approx(list(expected), abs=1e-5)


def test_unseen_template_is_all_zeros_and_other_scorers_are_refused() -> None:
    rng = np.random.default_rng(1)
    [candidate] = _candidates(rng, 1)
    unseen = Candidate(**{**candidate.__dict__, "template": "new"})
    assert feature_matrix([unseen], ["t0\x1f"])[0, -1] == 0.0
    predictor = KeeperPredictor(
        parameters(
            categories=[],
            mean=np.zeros(4),
            scale=np.ones(4),
            coef=np.zeros(4),
            intercept=0.0,
            calibration_slope=1.0,
            calibration_intercept=0.0,
        )
    )
    with pytest.raises(KeeperModelError, match="expects 4 features, got 13"):
        predictor.predict([candidate])
    with pytest.raises(KeeperModelError, match="format"):
        KeeperPredictor({"format": 99})
