"""The exporter's figures, read from Postgres, against rows the test wrote: jobs by status,
images, what remains, the recent rate and the projected finish, the oldest waiting job, the
review backlog and keep rate; and a database outage reported as a metric, not an error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from db.models import (
    Decision,
    Image,
    ImageReview,
    JobStatus,
    Reviewer,
    ReviewItem,
    ReviewStatus,
    Run,
    RunStatus,
)
from monitoring.exporter import DatabaseCollector, read_snapshot, snapshot_metrics
from tests.cost_rows import DUSK_REVIEW, REVIEWER_SECONDS, make_costed_run
from tests.factories import add_job, image_row

NOW = datetime(2026, 11, 25, 23, 0, tzinfo=UTC)


def _image(job_id: int, seed: int, created: datetime) -> Image:
    return image_row(job_id, seed, created_at=created)


def test_snapshot_matches_the_rows(db_session: Session) -> None:
    run = Run(name="night", source="c.csv", created_at=NOW - timedelta(hours=2))
    old = Run(name="last-week", source="c.csv", created_at=NOW - timedelta(days=7))
    old.status = RunStatus.FINISHED
    paused = Run(name="paused", source="c.csv", created_at=NOW - timedelta(hours=1))
    paused.status = RunStatus.PAUSED
    db_session.add_all([run, old, paused])
    db_session.flush()
    done = add_job(db_session, run, JobStatus.DONE, [1, 2, 3])
    running = add_job(db_session, run, JobStatus.RUNNING, [4, 5, 6, 7])
    pending = add_job(db_session, run, JobStatus.PENDING, [8, 9])
    pending.created_at = NOW - timedelta(minutes=90)
    add_job(db_session, run, JobStatus.BLOCKED, [10])
    add_job(db_session, old, JobStatus.DONE, [1])
    waiting_paused = add_job(db_session, paused, JobStatus.PENDING, [1])
    waiting_paused.created_at = NOW - timedelta(hours=50)  # paused: not "waiting"
    # 3 images an hour ago, 1 in the last ten minutes (0.2 images/minute... 1 per 600 s).
    for seed in (1, 2, 3):
        db_session.add(_image(done.id, seed, NOW - timedelta(hours=1)))
    db_session.add(_image(running.id, 4, NOW - timedelta(minutes=3)))
    reviewer = Reviewer(name="ann", password_hash="x")
    db_session.add(reviewer)
    db_session.flush()
    item_done = ReviewItem(run_id=run.id, item_id=done.item_id, status=ReviewStatus.DONE)
    item_open = ReviewItem(run_id=run.id, item_id=running.item_id, status=ReviewStatus.OPEN)
    db_session.add_all([item_done, item_open])
    db_session.flush()
    images = {i.seed: i for i in db_session.query(Image).filter(Image.job_id == done.id)}
    for seed, decision in ((1, Decision.KEEP), (2, Decision.REJECT), (3, Decision.REJECT)):
        db_session.add(
            ImageReview(image_id=images[seed].id, run_id=run.id, review_item_id=item_done.id,
                        decision=decision, reviewer_id=reviewer.id)
        )  # fmt: skip
    db_session.flush()

    snapshot = read_snapshot(db_session, now=NOW)
    by_name = {r.name: r for r in snapshot.runs}
    assert set(by_name) == {"night", "paused"}  # last week's finished run is not recent
    night = by_name["night"]
    assert night.jobs == {"done": 1, "running": 1, "pending": 1, "blocked": 1}
    assert night.images == 4
    assert night.images_planned == 9  # the blocked job's seed is not planned
    assert night.remaining_images == 5  # 4 + 2 open seeds, 1 of them made
    assert night.images_per_second == 1 / 600
    assert night.projected_finish(NOW) == NOW + timedelta(seconds=5 * 600)
    assert (night.review_backlog, night.reviewed, night.kept) == (1, 3, 1)
    assert snapshot.oldest_waiting_age == 90 * 60

    parsed = samples_of(snapshot_metrics(snapshot, deadline=timedelta(hours=10)))
    assert parsed[("pixelmill_run_jobs", (("run", "night"), ("status", "done")))] == 1
    assert parsed[("pixelmill_run_jobs", (("run", "night"), ("status", "dead")))] == 0
    assert parsed[("pixelmill_run_keep_ratio", (("run", "night"),))] == 1 / 3
    assert ("pixelmill_run_keep_ratio", (("run", "paused"),)) not in parsed  # none reviewed
    assert parsed[("pixelmill_run_active", (("run", "paused"),))] == 0
    assert (
        parsed[("pixelmill_run_projected_finish_timestamp_seconds", (("run", "night"),))]
        == (NOW + timedelta(seconds=3000)).timestamp()
    )
    assert (
        parsed[("pixelmill_run_deadline_timestamp_seconds", (("run", "night"),))]
        == (NOW + timedelta(hours=8)).timestamp()
    )
    # The paused run makes nothing: no projection rather than a made-up one.
    assert ("pixelmill_run_projected_finish_timestamp_seconds", (("run", "paused"),)) not in parsed


def test_a_finished_run_is_projected_at_its_finish_not_now(db_session: Session) -> None:
    # Finished on time: its projection must not move along with the clock past its deadline.
    run = Run(name="done", source="c.csv", created_at=NOW - timedelta(hours=11))
    run.status = RunStatus.FINISHED
    run.finished_at = NOW - timedelta(hours=3)
    db_session.add(run)
    db_session.flush()
    done = add_job(db_session, run, JobStatus.DONE, [1])
    db_session.add(_image(done.id, 1, NOW - timedelta(hours=3)))
    db_session.flush()

    (figures,) = read_snapshot(db_session, now=NOW).runs
    assert figures.remaining_images == 0
    assert figures.projected_finish(NOW) == NOW - timedelta(hours=3)
    # Nothing left but not marked finished (yet): no projection at all.
    figures.finished_at = None
    assert figures.projected_finish(NOW) is None


def test_a_young_run_is_measured_since_its_first_image(db_session: Session) -> None:
    """A run that began two minutes ago and makes an image a second reads 1 image/s (not
    the tenth of it that a ten-minute window gives), and its finish is projected by it."""
    young = Run(name="young", source="c.csv", created_at=NOW - timedelta(minutes=3))
    db_session.add(young)
    db_session.flush()
    running = add_job(db_session, young, JobStatus.RUNNING, list(range(1000)))
    # 120 images over the last 120 s, the first exactly two minutes ago.
    for seed in range(120):
        db_session.add(_image(running.id, seed, NOW - timedelta(seconds=120 - seed)))
    just_started = Run(name="just-started", source="c.csv", created_at=NOW - timedelta(minutes=1))
    db_session.add(just_started)
    db_session.flush()
    first_batch = add_job(db_session, just_started, JobStatus.RUNNING, [1, 2, 3, 4, 5])
    for seed in (1, 2, 3, 4):  # one batch of four, two seconds ago
        db_session.add(_image(first_batch.id, seed, NOW - timedelta(seconds=2)))
    db_session.flush()

    by_name = {r.name: r for r in read_snapshot(db_session, now=NOW).runs}
    run = by_name["young"]
    assert run.first_image_at == NOW - timedelta(seconds=120)
    assert run.images_per_second == 1.0
    assert run.remaining_images == 880
    assert run.projected_finish(NOW) == NOW + timedelta(seconds=880)
    parsed = samples_of(snapshot_metrics(read_snapshot(db_session, now=NOW), timedelta(hours=1)))
    assert parsed[("pixelmill_run_images_per_second", (("run", "young"),))] == 1.0
    # A first batch just in: measured over at least ten seconds, not over two.
    assert by_name["just-started"].images_per_second == 4 / 10


def samples_of(families: list) -> dict:  # type: ignore[type-arg]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_cost_per_keeper_per_run_and_variant(db_session: Session) -> None:
    made = make_costed_run(db_session)  # its figures are worked out in tests/cost_rows.py
    parsed = samples_of(snapshot_metrics(read_snapshot(db_session), deadline=timedelta(hours=1)))

    run = (("run", "costed"),)
    assert parsed[("pixelmill_run_gpu_seconds", run)] == 22.0
    assert parsed[("pixelmill_run_gpu_seconds_per_image", run)] == 22 / 7
    assert parsed[("pixelmill_run_gpu_seconds_per_keeper", run)] == 22 / 3
    assert parsed[("pixelmill_run_reviewer_seconds", run)] == REVIEWER_SECONDS
    assert parsed[("pixelmill_run_reviewer_seconds_per_keeper", run)] == REVIEWER_SECONDS / 3
    assert parsed[("pixelmill_run_auto_rejected_images", run)] == 1
    assert parsed[("pixelmill_run_early_stop_skipped_seeds", run)] == 5
    assert parsed[("pixelmill_run_early_stop_gpu_seconds_saved", run)] == 24.0
    assert parsed[("pixelmill_run_keeper_recall_top_k", run)] == 1.0
    assert parsed[("pixelmill_run_images_kept", run)] == 3
    dusk = (("run", "costed"), ("template", "outdoor"), ("variant", "dusk"))
    assert parsed[("pixelmill_variant_images", dusk)] == 2
    assert parsed[("pixelmill_variant_images_kept", dusk)] == 1
    assert parsed[("pixelmill_variant_gpu_seconds_per_keeper", dusk)] == 8.0
    assert parsed[("pixelmill_variant_reviewer_seconds_per_keeper", dusk)] == DUSK_REVIEW
    assert parsed[("pixelmill_variant_early_stop_gpu_seconds_saved", dusk)] == 24.0
    # The other run: one keeper, no prediction, one review event: no recall, no review time.
    other = (("run", made.other.name),)
    assert parsed[("pixelmill_run_gpu_seconds_per_keeper", other)] == 9.0
    assert parsed[("pixelmill_run_reviewer_seconds", other)] == 0.0
    assert ("pixelmill_run_keeper_recall_top_k", other) not in parsed


def test_unreachable_database_is_a_metric_not_an_error() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    collector = DatabaseCollector(engine, deadline=timedelta(hours=1))
    parsed = samples_of(list(collector.collect()))
    assert parsed[("pixelmill_exporter_database_up", ())] == 0
    assert ("pixelmill_exporter_scrape_duration_seconds", ()) in parsed
    engine.dispose()
