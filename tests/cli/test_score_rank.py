"""`pixelmill score RUN` and `pixelmill rank train`, in process, on Postgres with a local
folder of images and the built-in tiny scorer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cli.main import app
from db.models import Decision, Image, ImageReview, Job, ReviewItem
from db.ranking import ImageScore, KeeperModel, KeeperPrediction
from pixelmill.storage import LocalStorage
from tests.factories import add_images, make_job, make_reviewer, make_run


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture
def env(
    fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Session]:
    monkeypatch.setenv("PIXELMILL_DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("PIXELMILL_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("PIXELMILL_STORAGE", "local")
    monkeypatch.setenv("PIXELMILL_STORAGE_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("PIXELMILL_SCORER", "tiny")
    monkeypatch.setenv("PIXELMILL_KEEPER_MIN_DECISIONS", "20")
    engine = create_engine(fresh_database_url)
    with Session(engine) as session:
        yield session
    engine.dispose()


def _rendered_run(session: Session, storage: LocalStorage, items: int) -> str:
    run = make_run(session, name="night", source="catalogue.csv")
    for _ in range(items):
        job = make_job(session, run, seeds=list(range(6)), commit=False)
        add_images(session, job, storage)
    session.commit()
    return run.name


def _decide_all(session: Session, rng: np.random.Generator) -> None:
    reviewer = make_reviewer(session)
    rows = session.execute(select(ImageScore.image_id)).scalars().all()
    for image_id in rows:
        image = session.get(Image, image_id)
        assert image is not None
        job = session.get(Job, image.job_id)
        assert job is not None
        item = session.scalar(
            select(ReviewItem).where(
                ReviewItem.run_id == job.run_id, ReviewItem.item_id == job.item_id
            )
        )
        if item is None:
            item = ReviewItem(run_id=job.run_id, item_id=job.item_id)
            session.add(item)
            session.flush()
        keep = rng.random() < 0.3
        session.add(
            ImageReview(
                image_id=image_id,
                run_id=job.run_id,
                review_item_id=item.id,
                decision=Decision.KEEP if keep else Decision.REJECT,
                reviewer_id=reviewer.id,
            )
        )
    session.commit()


def test_score_then_train_then_models(env: Session, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "images")
    name = _rendered_run(env, storage, items=8)

    code, out = invoke("score", name)
    assert code == 0, out
    assert "48 images scored, 0 already scored" in out
    code, out = invoke("score", name)
    assert "0 images scored, 48 already scored" in out
    assert env.scalar(select(func.count()).select_from(ImageScore)) == 48

    _decide_all(env, np.random.default_rng(0))
    code, out = invoke("rank", "train")
    assert code == 0, out
    assert "test: version 1: " in out
    assert env.scalar(select(func.count()).select_from(KeeperModel)) == 1
    assert env.scalar(select(func.count()).select_from(KeeperPrediction)) == 48
    code, out = invoke("rank", "train")
    assert "no source is due" in out
    code, out = invoke("rank", "models")
    assert "test  v1  trained on" in out


def test_score_without_a_scorer_or_run_is_one_line(
    env: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = invoke("score", "nowhere")
    assert (code, "no run 'nowhere'" in out) == (1, True)
    monkeypatch.setenv("PIXELMILL_SCORER", "")
    code, out = invoke("score", "nowhere")
    assert code == 2 and "no scorer configured" in out and "Traceback" not in out
