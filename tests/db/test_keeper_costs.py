"""Cost per keeper against rows whose figures are known by hand (tests/cost_rows.py), on
Postgres and on the embedded SQLite database alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.keeper_costs import reviewer_times, run_costs, runs_costs
from db.migrate import upgrade
from db.models import Job, Reviewer
from db.session import make_engine
from tests.cost_rows import (
    DUSK_REVIEW,
    REVIEWER_SECONDS,
    STUDIO_REVIEW,
    make_costed_run,
)
from tests.factories import make_job


@pytest.fixture(params=["postgres", "sqlite"])
def any_session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    if request.param == "postgres":
        yield request.getfixturevalue("db_session")
        return
    url = f"sqlite:///{tmp_path / 'pixelmill.db'}"
    upgrade(url)
    engine = make_engine(url)
    with sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def test_costs_per_variant_template_and_run(any_session: Session) -> None:
    made = make_costed_run(any_session)
    costs = run_costs(any_session, made.run.id)

    studio = costs.variants[("studio", "")]
    assert (studio.images, studio.gpu_seconds) == (5, pytest.approx(14.0))
    assert studio.gpu_seconds_per_image == pytest.approx(2.8)
    assert (studio.kept, studio.rejected, studio.auto_rejected) == (2, 1, 1)
    assert studio.gpu_seconds_per_keeper == pytest.approx(7.0)
    assert studio.reviewer_seconds == pytest.approx(STUDIO_REVIEW)
    assert studio.reviewer_seconds_per_keeper == pytest.approx(STUDIO_REVIEW / 2)
    assert (studio.skipped_seeds, studio.gpu_seconds_saved) == (0, 0.0)

    dusk = costs.variants[("outdoor", "dusk")]
    assert (dusk.images, dusk.gpu_seconds, dusk.kept) == (2, pytest.approx(8.0), 1)
    # Its auto-reject of seed 5 was overridden by ann's decision: not counted.
    assert dusk.auto_rejected == 0
    assert dusk.reviewer_seconds_per_keeper == pytest.approx(DUSK_REVIEW)
    # 3 seeds at the job's own mean (4 s), 2 at the mean of the run's 128 px images (6 s).
    assert (dusk.skipped_seeds, dusk.gpu_seconds_saved) == (5, pytest.approx(24.0))

    total = costs.total
    assert (total.images, total.gpu_seconds, total.kept) == (7, pytest.approx(22.0), 3)
    assert total.reviewer_seconds == pytest.approx(REVIEWER_SECONDS)
    assert total.reviewer_seconds_per_keeper == pytest.approx(REVIEWER_SECONDS / 3)
    assert (total.auto_rejected, total.gpu_seconds_saved) == (1, pytest.approx(24.0))
    assert costs.templates["outdoor"].gpu_seconds_per_keeper == pytest.approx(8.0)


def test_keeper_recall_in_the_top_k(any_session: Session) -> None:
    made = make_costed_run(any_session)
    # Item A ranked without the flagged image: 1, 2, 5, 4, 14. Kept 1 is first, kept 4
    # fourth; kept 13 has no prediction and is not ranked.
    default = run_costs(any_session, made.run.id)
    assert default.top_k == 4
    assert (default.total.ranked_keepers, default.total.keepers_in_top_k) == (2, 2)
    two = run_costs(any_session, made.run.id, top_k=2)
    assert two.total.keeper_recall == pytest.approx(0.5)
    assert two.variants[("studio", "")].keeper_recall == 1.0
    assert two.variants[("outdoor", "dusk")].keeper_recall == 0.0


def test_runs_are_kept_apart_and_an_empty_run_has_no_ratios(any_session: Session) -> None:
    made = make_costed_run(any_session)
    both = runs_costs(any_session, [made.run.id, made.other.id])
    assert both[made.other.id].total.kept == 1
    assert both[made.other.id].total.gpu_seconds == pytest.approx(9.0)
    assert both[made.other.id].total.reviewer_seconds == 0.0  # one event: its first
    assert both[made.run.id].total.kept == 3
    assert runs_costs(any_session, []) == {}
    empty = run_costs(any_session, made.run.id + made.other.id + 1)
    assert empty.total.gpu_seconds_per_image is None
    assert empty.total.gpu_seconds_per_keeper is None
    assert empty.total.reviewer_seconds_per_keeper is None
    assert empty.total.keeper_recall is None


def test_reviewer_times(any_session: Session) -> None:
    made = make_costed_run(any_session)
    times = {t.name: t for t in reviewer_times(any_session, made.run.id)}
    assert (times["ann"].decisions, times["ann"].seconds) == (5, pytest.approx(360.0))
    assert (times["bo"].decisions, times["bo"].seconds) == (0, pytest.approx(60.0))
    bo_id = any_session.scalars(select(Reviewer.id).where(Reviewer.name == "bo")).one()
    (bo,) = reviewer_times(any_session, made.run.id, bo_id)
    assert bo.name == "bo"


def test_a_json_null_of_skipped_seeds_skips_nothing(any_session: Session) -> None:
    made = make_costed_run(any_session)
    # An explicit None stores a JSON null, which the databases' array lengths refuse.
    job = make_job(any_session, made.run, commit=False, seeds=[20], skipped_seeds=None)
    any_session.flush()
    assert any_session.scalar(select(Job.skipped_seeds.is_(None)).where(Job.id == job.id)) is False
    assert run_costs(any_session, made.run.id).total.skipped_seeds == 5
