"""The keeper model's features and its prediction, shared by training and every reader.

Review trains the model from reviewers' decisions (scikit-learn); the worker (early stop) and
review (the ranked grid) predict with it. Both must build the same features the same way, and
prediction must not need scikit-learn or unpickle anything, so a trained model is a plain
dictionary (stored as JSON in ``keeper_models.parameters``) and prediction is NumPy:

    p = sigmoid(a * (w . standardise(x) + b) + c)

``w, b`` are a logistic regression's; ``a, c`` its Platt calibration, fitted on decision
values the model did not train on, so that ``p`` can be read as a probability (the cut the
grid draws and automatic rejection both rely on that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pixelmill.errors import PixelmillError

PARAMETERS_FORMAT = 1

FloatArray = npt.NDArray[np.float32]


class KeeperModelError(PixelmillError, ValueError):
    """A stored keeper model cannot be used (unknown format, features of another scorer)."""


@dataclass(frozen=True)
class Candidate:
    """What the keeper model knows of one image."""

    embedding: bytes  # L2-normalised float16, as stored in image_scores
    clip_score: float
    aesthetic_score: float | None
    image_similarity: float | None
    template: str
    variant: str


def embedding_from_bytes(data: bytes) -> FloatArray:
    return np.frombuffer(data, dtype="<f2").astype(np.float32)


def embedding_to_bytes(vector: npt.ArrayLike) -> bytes:
    """``vector`` L2-normalised, as little-endian float16 bytes."""
    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array))
    if norm > 0:
        array = array / norm
    return array.astype("<f2").tobytes()


def category(template: str, variant: str) -> str:
    return f"{template}\x1f{variant}"


def feature_matrix(candidates: Sequence[Candidate], categories: Sequence[str]) -> FloatArray:
    """One row per candidate: embedding, the three scores (with presence flags) and a one-hot
    template/variant among ``categories`` (an unseen one is all zeros)."""
    if not candidates:
        return np.zeros((0, 0), dtype=np.float32)
    embeddings = np.stack([embedding_from_bytes(c.embedding) for c in candidates])
    scores = np.array(
        [
            (
                c.clip_score,
                c.aesthetic_score or 0.0,
                float(c.aesthetic_score is not None),
                c.image_similarity or 0.0,
                float(c.image_similarity is not None),
            )
            for c in candidates
        ],
        dtype=np.float32,
    )
    index = {name: position for position, name in enumerate(categories)}
    one_hot = np.zeros((len(candidates), len(categories)), dtype=np.float32)
    for row, candidate in enumerate(candidates):
        position = index.get(category(candidate.template, candidate.variant))
        if position is not None:
            one_hot[row, position] = 1.0
    return np.hstack([embeddings, scores, one_hot])


def prior_score(candidate: Candidate) -> float:
    """The order before any model is trained: prompt match first, then the aesthetic rating
    (LAION's 1-10 scale brought to the cosine's range), then likeness to the product photo."""
    aesthetic = 0.0 if candidate.aesthetic_score is None else candidate.aesthetic_score / 10.0
    similarity = candidate.image_similarity or 0.0
    return candidate.clip_score + 0.5 * aesthetic + 0.5 * similarity


class KeeperPredictor:
    """Predicts keep probabilities with a trained model's parameters."""

    def __init__(self, parameters: dict[str, Any]) -> None:
        if parameters.get("format") != PARAMETERS_FORMAT:
            raise KeeperModelError(f"unknown keeper model format {parameters.get('format')!r}")
        self.categories: list[str] = list(parameters["categories"])
        self.mean = np.asarray(parameters["mean"], dtype=np.float32)
        self.scale = np.asarray(parameters["scale"], dtype=np.float32)
        self.coef = np.asarray(parameters["coef"], dtype=np.float32)
        self.intercept = float(parameters["intercept"])
        self.calibration_slope = float(parameters["calibration"]["slope"])
        self.calibration_intercept = float(parameters["calibration"]["intercept"])

    def decision(self, features: FloatArray) -> npt.NDArray[np.float64]:
        standardised = (features - self.mean) / self.scale
        return (standardised @ self.coef + self.intercept).astype(np.float64)

    def predict(self, candidates: Sequence[Candidate]) -> list[float]:
        if not candidates:
            return []
        features = feature_matrix(candidates, self.categories)
        if features.shape[1] != self.coef.shape[0]:
            raise KeeperModelError(
                f"keeper model expects {self.coef.shape[0]} features, got {features.shape[1]} "
                "(a different scorer's embeddings?)"
            )
        logits = self.calibration_slope * self.decision(features) + self.calibration_intercept
        return [float(p) for p in 1.0 / (1.0 + np.exp(-logits))]


def parameters(
    *,
    categories: Sequence[str],
    mean: npt.ArrayLike,
    scale: npt.ArrayLike,
    coef: npt.ArrayLike,
    intercept: float,
    calibration_slope: float,
    calibration_intercept: float,
) -> dict[str, Any]:
    """The JSON form of a trained model (what :class:`KeeperPredictor` reads)."""
    return {
        "format": PARAMETERS_FORMAT,
        "categories": list(categories),
        "mean": [float(v) for v in np.asarray(mean).ravel()],
        "scale": [float(v) for v in np.asarray(scale).ravel()],
        "coef": [float(v) for v in np.asarray(coef).ravel()],
        "intercept": float(intercept),
        "calibration": {
            "slope": float(calibration_slope),
            "intercept": float(calibration_intercept),
        },
    }
