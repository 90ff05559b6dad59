"""The app's background work for ranking, on Postgres: the retraining thread starts and stops
with the app and, once a source has enough decisions, trains its keeper model and refreshes the
predictions; the queue's sync thread lets the model reject below PIXELMILL_AUTO_REJECT_BELOW
when items enter the queue. Neither runs on a request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Image
from db.ranking import AutoReject, KeeperModel, KeeperPrediction
from pixelmill.storage import Storage
from review.app import create_app
from tests.review.conftest import review_settings
from tests.review.factory import make_run
from tests.review.ranking_rows import add_model, add_predictions, add_scores
from tests.review.test_ranking_train import plant_decisions


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the background thread never did it"
        time.sleep(0.2)


def _count(sessions: sessionmaker[Session], model: type) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _alive(name: str) -> bool:
    return any(thread.name == name and thread.is_alive() for thread in threading.enumerate())


def test_the_app_retrains_after_enough_new_decisions_and_refreshes_predictions(
    tmp_path: Path, fresh_database_url: str, sessions: sessionmaker[Session], storage: Storage
) -> None:
    with sessions() as session:
        plant_decisions(session, items=20, per_item=8, noise=0.1)
        session.commit()
    settings = review_settings(
        tmp_path, fresh_database_url, keeper_min_decisions=100, keeper_retrain_every=50
    )
    app = create_app(
        settings,
        sessions=sessions,
        storage=storage,
        background_sync=False,
        background_retrain=True,
        retrain_check_seconds=0.2,
    )
    with TestClient(app):
        assert _alive("keeper-retrain")
        _wait_for(lambda: _count(sessions, KeeperModel) == 1)
        _wait_for(lambda: _count(sessions, KeeperPrediction) == 160)
        with sessions() as session:
            plant_decisions(session, items=10, per_item=6, noise=0.1, seed=1)
            session.commit()
        _wait_for(lambda: _count(sessions, KeeperModel) == 2)
        _wait_for(lambda: _count(sessions, KeeperPrediction) == 220)
        with sessions() as session:
            versions = set(
                session.scalars(
                    select(KeeperModel.version).join(
                        KeeperPrediction, KeeperPrediction.model_id == KeeperModel.id
                    )
                )
            )
        assert versions == {2}  # every prediction refreshed by the new model
    assert not _alive("keeper-retrain")  # stopped with the app


def test_the_sync_thread_lets_the_model_reject_as_items_enter_the_queue(
    tmp_path: Path, fresh_database_url: str, sessions: sessionmaker[Session], storage: Storage
) -> None:
    with sessions() as session:
        made = make_run(session, items=2, templates=("studio",), seeds=3, storage=storage)
        images = made.images
        add_scores(session, images, [0.2] * len(images))
        add_predictions(session, add_model(session), images, [0.05, 0.5, 0.9, 0.1, 0.3, 0.01])
    settings = review_settings(
        tmp_path, fresh_database_url, review_sync_seconds=0.2, auto_reject_below=0.15
    )
    app = create_app(settings, sessions=sessions, storage=storage, background_retrain=False)
    with TestClient(app):
        _wait_for(lambda: _count(sessions, AutoReject) == 3)
    with sessions() as session:
        rejected = set(session.scalars(select(AutoReject.image_id)))
        assert rejected == {images[0].id, images[3].id, images[5].id}
        assert session.scalar(select(func.count()).select_from(Image)) == 6
