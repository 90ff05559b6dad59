"""Training a source's keeper model from its recorded decisions.

A logistic regression on the CLIP embedding, the scores and the template/variant: few
decisions (hundreds) and many features (the embedding) call for a linear model with its
regularisation chosen by cross-validation, and a linear model's decision values calibrate
well with Platt scaling. The calibration is fitted on out-of-fold decision values (values
the model did not train on), so its probabilities mean what they say; the area under the
ROC curve is measured on items held out of both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import (
    GroupShuffleSplit,
    StratifiedKFold,
    cross_val_predict,
    cross_val_score,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.ranking import KeeperModel
from pixelmill.keeper import KeeperPredictor, category, feature_matrix, parameters
from review.ranking.decisions import Example, decision_count, main_scorer, training_examples

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2
REGULARISATION_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass(frozen=True)
class TrainingOutcome:
    source: str
    model: KeeperModel | None
    reason: str  # why no model was trained, or a summary of the one that was


def train_keeper_model(session: Session, source: str, *, min_decisions: int) -> TrainingOutcome:
    """Train (and store, uncommitted) the next version of ``source``'s keeper model."""
    seen = decision_count(session, source)
    scorer = main_scorer(session, source)
    if scorer is None:
        return TrainingOutcome(source, None, f"{seen} decisions, none on scored images")
    examples = training_examples(session, source, scorer)
    kept = sum(example.kept for example in examples)
    if len(examples) < min_decisions:
        reason = f"{len(examples)} decisions on scored images, {min_decisions} needed"
        return TrainingOutcome(source, None, reason)
    if kept in (0, len(examples)):
        return TrainingOutcome(source, None, f"all {len(examples)} decisions are the same")
    train, held_out = _split(examples)
    fitted = _fit(train)
    auc = _held_out_auc(fitted, held_out)
    model = KeeperModel(
        source=source,
        version=_next_version(session, source),
        scorer=scorer,
        trained_on=len(train),
        held_out=len(held_out),
        auc=auc,
        decisions_seen=seen,
        parameters=fitted,
    )
    session.add(model)
    session.flush()
    auc_text = "n/a" if auc is None else f"{auc:.3f}"
    summary = f"version {model.version}: {len(train)} decisions, held-out AUC {auc_text}"
    log.info("keeper model for %s: %s", source, summary)
    return TrainingOutcome(source, model, summary)


def _split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """Whole items held out, so near-identical candidates of one item are never on both sides."""
    groups = [example.item_id for example in examples]
    if len(set(groups)) < 5:
        return examples, []
    splitter = GroupShuffleSplit(n_splits=1, test_size=HELD_OUT_FRACTION, random_state=0)
    train_index, test_index = next(splitter.split(examples, groups=groups))
    train = [examples[i] for i in train_index]
    if len({example.kept for example in train}) < 2:
        return examples, []
    return train, [examples[i] for i in test_index]


def _fit(train: list[Example]) -> dict[str, Any]:
    categories = sorted({category(e.candidate.template, e.candidate.variant) for e in train})
    features = feature_matrix([e.candidate for e in train], categories)
    labels = np.array([e.kept for e in train], dtype=int)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-6] = 1.0
    standardised = (features - mean) / scale
    folds = min(5, int(min(labels.sum(), len(labels) - labels.sum())))
    strength, out_of_fold = 1.0, None
    if folds >= 2:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
        strength = _choose_strength(standardised, labels, cv)
        out_of_fold = cross_val_predict(
            LogisticRegression(C=strength, max_iter=2000),
            standardised,
            labels,
            cv=cv,
            method="decision_function",
        )
    model = LogisticRegression(C=strength, max_iter=2000).fit(standardised, labels)
    if out_of_fold is None:
        slope, offset = 1.0, 0.0
    else:
        platt = LogisticRegression(C=1e6, max_iter=2000).fit(out_of_fold.reshape(-1, 1), labels)
        slope, offset = float(platt.coef_[0][0]), float(platt.intercept_[0])
    return parameters(
        categories=categories,
        mean=mean,
        scale=scale,
        coef=model.coef_[0],
        intercept=float(model.intercept_[0]),
        calibration_slope=slope,
        calibration_intercept=offset,
    )


def _choose_strength(
    features: npt.NDArray[np.float32], labels: npt.NDArray[np.int_], cv: StratifiedKFold
) -> float:
    """The regularisation with the best cross-validated log loss: the app draws its cut line
    from the probabilities, so how far apart they put keepers and rejects counts, not only
    their order (a strongly regularised model ranks as well and separates less)."""
    scores = {
        strength: float(
            cross_val_score(
                LogisticRegression(C=strength, max_iter=2000),
                features,
                labels,
                cv=cv,
                scoring="neg_log_loss",
            ).mean()
        )
        for strength in REGULARISATION_GRID
    }
    return max(scores, key=lambda strength: (scores[strength], -strength))


def _held_out_auc(fitted: dict[str, Any], held_out: list[Example]) -> float | None:
    labels = [example.kept for example in held_out]
    if len(set(labels)) < 2:
        return None
    probabilities = KeeperPredictor(fitted).predict([example.candidate for example in held_out])
    return float(roc_auc_score(labels, probabilities))


def _next_version(session: Session, source: str) -> int:
    latest = session.scalar(
        select(func.max(KeeperModel.version)).where(KeeperModel.source == source)
    )
    return 1 if latest is None else int(latest) + 1
