"""`pixelmill score RUN`'s work: images already rendered are scored from storage, batch by
batch, once per scorer, on Postgres with local storage."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.ranking import ImageScore
from pixelmill.storage import LocalStorage
from tests.factories import add_images, make_job, make_run
from worker.scoring import rescore
from worker.scoring.scorer import load_scorer
from worker.scoring.tiny import HEAD_FILE, build_tiny_scorer


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scorers")
    return build_tiny_scorer(root / "a"), build_tiny_scorer(root / "b", seed=1)


def test_scores_every_stored_image_once_per_scorer(
    db_session: Session,
    tmp_path: Path,
    scorer_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rescore, "BATCH", 4)  # several batches from ten images
    storage = LocalStorage(tmp_path / "images")
    run = make_run(db_session)
    for seeds in ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10]):
        job = make_job(db_session, run, seeds=seeds, commit=False)
        add_images(db_session, job, storage)
    db_session.commit()
    first = load_scorer(str(scorer_dirs[0]), head_path=scorer_dirs[0] / HEAD_FILE)
    seen: list[tuple[int, int]] = []

    report = rescore.rescore_run(
        db_session, storage, first, run.id, progress=lambda done, total: seen.append((done, total))
    )

    assert (report.scored, report.already) == (10, 0)
    assert seen[-1] == (10, 10) and len(seen) == 3
    rows = db_session.scalars(select(ImageScore)).all()
    assert {row.scorer for row in rows} == {first.identity}
    assert all(row.aesthetic_score is not None for row in rows)

    again = rescore.rescore_run(db_session, storage, first, run.id)
    assert (again.scored, again.already) == (0, 10)

    second = load_scorer(str(scorer_dirs[1]))
    other = rescore.rescore_run(db_session, storage, second, run.id)
    assert (other.scored, other.already) == (10, 0)
    db_session.expire_all()
    assert {row.scorer for row in db_session.scalars(select(ImageScore))} == {second.identity}
