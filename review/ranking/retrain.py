"""Retraining off the request path: after every N new decisions on a source, a background
thread (started with the review app) trains its next keeper model, re-predicts the source's
images with it and, when automatic rejection is on, rejects what the new predictions put
below its threshold."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from db.ranking import latest_keeper_model
from pixelmill.settings import Settings
from review.ranking.auto_reject import make_auto_rejects
from review.ranking.decisions import decision_count, sources_with_decisions
from review.ranking.predict import predict_source
from review.ranking.train import TrainingOutcome, train_keeper_model

log = logging.getLogger(__name__)


def due_for_training(session: Session, source: str, settings: Settings) -> bool:
    count = decision_count(session, source)
    if count < settings.keeper_min_decisions:
        return False
    model = latest_keeper_model(session, source)
    return model is None or count - model.decisions_seen >= settings.keeper_retrain_every


def retrain_due(
    session: Session, settings: Settings, *, force: bool = False
) -> list[TrainingOutcome]:
    """Train every source that is due (every source with decisions when ``force``), predict
    its images with the new model (then reject automatically below
    PIXELMILL_AUTO_REJECT_BELOW, when set), and commit each source on its own."""
    outcomes: list[TrainingOutcome] = []
    for source in sources_with_decisions(session):
        if not force and not due_for_training(session, source, settings):
            continue
        outcome = train_keeper_model(
            session, source, min_decisions=10 if force else settings.keeper_min_decisions
        )
        if outcome.model is not None:
            predict_source(session, outcome.model)
            if settings.auto_reject_below is not None:
                make_auto_rejects(session, settings.auto_reject_below)
        session.commit()
        outcomes.append(outcome)
    return outcomes


class RetrainThread:
    """Checks every ``interval`` seconds whether a source is due, in its own thread."""

    def __init__(
        self,
        sessions: Callable[[], AbstractContextManager[Session]],
        settings: Settings,
        interval: float,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="keeper-retrain", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                with self.sessions() as session:
                    retrain_due(session, self.settings)
            except Exception:  # the database may be away for a moment: try again later
                log.exception("keeper model retraining failed")
