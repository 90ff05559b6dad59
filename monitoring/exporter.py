"""`pixelmill exporter`: run progress read from Postgres on every scrape.

The workers count what they do; how far a run is, how old its oldest waiting job is and when
it will finish are facts of the database, so they are read from it, when Prometheus asks, by
a custom collector: a handful of grouped queries over the recent runs' rows, in one read-only
transaction with a statement timeout, nothing cached between scrapes. Labels name runs (a few
recent ones) and, for what keepers cost (monitoring.cost_metrics), their templates and
variants; never jobs or images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import ColumnElement, Engine, case, func, or_, select, text
from sqlalchemy.orm import Session

from db.keeper_costs import RunCosts, json_array_length, runs_costs
from db.models import (
    OPEN_JOB_STATUSES,
    Decision,
    Image,
    ImageReview,
    Job,
    JobStatus,
    ReviewItem,
    ReviewStatus,
    Run,
    RunStatus,
)
from monitoring.cost_metrics import add_run_costs, cost_families

log = logging.getLogger(__name__)

# A run is "recent" while it is active or paused, or for a day after it was produced.
RECENT = timedelta(hours=24)
MAX_RUNS = 20
# The rate behind the projected finish: images made over the last ten minutes, or since the
# run's first image when that is more recent (a run begun two minutes ago is measured over
# those two minutes, not over ten of which eight made nothing).
RATE_WINDOW = timedelta(minutes=10)
# The shortest window a rate is measured over: the first batch's images arrive together.
MIN_RATE_WINDOW = timedelta(seconds=10)
# One scrape must never hold the database for long.
STATEMENT_TIMEOUT_MS = 5000


@dataclass
class RunFigures:
    name: str
    created_at: datetime
    active: bool = False
    finished_at: datetime | None = None
    jobs: dict[str, int] = field(default_factory=dict)
    images: int = 0
    images_planned: int = 0
    # Seeds of the jobs still pending, queued or running, and the images they already have.
    open_planned: int = 0
    open_images: int = 0
    recent_images: int = 0
    # When the run's first image was made (None: none yet).
    first_image_at: datetime | None = None
    # The seconds recent_images were made over (RATE_WINDOW, or less for a young run).
    rate_seconds: float = RATE_WINDOW.total_seconds()
    review_backlog: int = 0
    reviewed: int = 0
    kept: int = 0
    # What its keepers cost (db.keeper_costs); None until read.
    costs: RunCosts | None = None

    @property
    def remaining_images(self) -> int:
        return max(0, self.open_planned - self.open_images)

    @property
    def images_per_second(self) -> float:
        return self.recent_images / self.rate_seconds

    def projected_finish(self, now: datetime) -> datetime | None:
        """When the open jobs will be done at the recent rate; None if nothing is made now.

        With nothing left, the run's own finish (None while it is not marked finished): a
        finished run projected at "now" would move past its deadline and alert all day.
        """
        if self.remaining_images == 0:
            return self.finished_at
        if self.images_per_second <= 0:
            return None
        return now + timedelta(seconds=self.remaining_images / self.images_per_second)


@dataclass
class Snapshot:
    now: datetime
    runs: list[RunFigures]
    oldest_waiting_age: float  # seconds; 0 when no job waits


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def read_snapshot(session: Session, now: datetime | None = None) -> Snapshot:
    now = now or datetime.now(UTC)
    runs = session.execute(
        select(Run.id, Run.name, Run.created_at, Run.status, Run.finished_at)
        .where(
            or_(
                Run.status.in_([RunStatus.ACTIVE, RunStatus.PAUSED]),
                Run.created_at >= now - RECENT,
            )
        )
        .order_by(Run.id.desc())
        .limit(MAX_RUNS)
    ).all()
    figures = {
        run_id: RunFigures(
            name,
            _aware(created),
            active=status == RunStatus.ACTIVE,
            finished_at=_aware(finished) if finished is not None else None,
        )
        for run_id, name, created, status, finished in runs
    }
    ids = list(figures)
    if ids:
        _read_jobs(session, figures, ids)
        _read_images(session, figures, ids, now)
        _read_review(session, figures, ids)
        for run_id, costs in runs_costs(session, ids).items():
            figures[run_id].costs = costs
    oldest = session.scalar(
        select(func.min(Job.created_at))
        .join(Run, Run.id == Job.run_id)
        .where(
            Job.status.in_([JobStatus.PENDING, JobStatus.QUEUED]),
            Run.status == RunStatus.ACTIVE,
        )
    )
    age = max(0.0, (now - _aware(oldest)).total_seconds()) if oldest is not None else 0.0
    return Snapshot(now=now, runs=[figures[i] for i in ids], oldest_waiting_age=age)


def _seed_count(session: Session) -> ColumnElement[int]:
    postgres = session.get_bind().dialect.name == "postgresql"
    length = func.jsonb_array_length if postgres else func.json_array_length
    # Seeds early stop left unrendered (skipped_seeds) are not planned images: never missing.
    planned = func.coalesce(func.sum(length(Job.seeds)), 0)
    # json_array_length: a JSON null (an explicit None) counts 0 rather than failing.
    skipped = json_array_length(session, Job.skipped_seeds)
    return planned - func.coalesce(func.sum(skipped), 0)


def _read_jobs(session: Session, figures: dict[int, RunFigures], ids: list[int]) -> None:
    rows = session.execute(
        select(Job.run_id, Job.status, func.count(), _seed_count(session))
        .where(Job.run_id.in_(ids))
        .group_by(Job.run_id, Job.status)
    ).all()
    for run_id, status, count, seeds in rows:
        run = figures[run_id]
        run.jobs[status] = int(count)
        if status not in (JobStatus.BLOCKED, JobStatus.CANCELLED):
            run.images_planned += int(seeds)
        if status in OPEN_JOB_STATUSES:
            run.open_planned += int(seeds)


def _read_images(
    session: Session, figures: dict[int, RunFigures], ids: list[int], now: datetime
) -> None:
    is_open = case((Job.status.in_(OPEN_JOB_STATUSES), 1), else_=0)
    is_recent = case((Image.created_at >= now - RATE_WINDOW, 1), else_=0)
    rows = session.execute(
        select(
            Job.run_id,
            func.count(Image.id),
            func.coalesce(func.sum(is_open), 0),
            func.coalesce(func.sum(is_recent), 0),
            func.min(Image.created_at),
        )
        .join(Job, Job.id == Image.job_id)
        .where(Job.run_id.in_(ids))
        .group_by(Job.run_id)
    ).all()
    for run_id, images, open_images, recent, first in rows:
        run = figures[run_id]
        run.images, run.open_images, run.recent_images = int(images), int(open_images), int(recent)
        if first is not None:
            run.first_image_at = _aware(first)
            run.rate_seconds = _rate_seconds(now - run.first_image_at)


def _rate_seconds(since_first_image: timedelta) -> float:
    """The window of a run's rate: the last RATE_WINDOW, or the time since its first image
    when that is shorter (at least MIN_RATE_WINDOW)."""
    return max(MIN_RATE_WINDOW, min(RATE_WINDOW, since_first_image)).total_seconds()


def _read_review(session: Session, figures: dict[int, RunFigures], ids: list[int]) -> None:
    backlog = session.execute(
        select(ReviewItem.run_id, func.count())
        .where(ReviewItem.run_id.in_(ids), ReviewItem.status == ReviewStatus.OPEN)
        .group_by(ReviewItem.run_id)
    ).all()
    for run_id, count in backlog:
        figures[run_id].review_backlog = int(count)
    kept = func.sum(case((ImageReview.decision == Decision.KEEP, 1), else_=0))
    decisions = session.execute(
        select(ImageReview.run_id, func.count(), func.coalesce(kept, 0))
        .where(ImageReview.run_id.in_(ids))
        .group_by(ImageReview.run_id)
    ).all()
    for run_id, reviewed, kept_count in decisions:
        figures[run_id].reviewed, figures[run_id].kept = int(reviewed), int(kept_count)


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def snapshot_metrics(snapshot: Snapshot, deadline: timedelta) -> list[Metric]:
    """The exporter's metric families for one snapshot of the database."""
    families = _run_families()
    costs = cost_families()
    for run in snapshot.runs:
        _add_run(families, run, snapshot.now, deadline)
        if run.costs is not None:
            add_run_costs(costs, run.name, run.costs)
    oldest = _gauge(
        "pixelmill_oldest_waiting_job_age_seconds",
        "Age of the oldest pending or queued job of an active run (0 when none waits).",
    )
    oldest.add_metric([], snapshot.oldest_waiting_age)
    return [*families.values(), *costs.values(), oldest]


def _run_families() -> dict[str, GaugeMetricFamily]:
    """The families labelled by run, still empty, in the order they are exported."""
    return {
        "active": _gauge(
            "pixelmill_run_active",
            "1 while the run is active (not paused, cancelled, finished).",
            ["run"],
        ),
        "jobs": _gauge("pixelmill_run_jobs", "Jobs of a recent run by status.", ["run", "status"]),
        "images": _gauge("pixelmill_run_images", "Image rows of a recent run.", ["run"]),
        "planned": _gauge(
            "pixelmill_run_images_planned",
            "Images a recent run plans: the seeds of its jobs, blocked and cancelled jobs and "
            "seeds early stop skipped left out (failed and dead jobs count: their images are "
            "planned but may never be made).",
            ["run"],
        ),
        "remaining": _gauge(
            "pixelmill_run_images_remaining",
            "Images its pending, queued and running jobs have still to make.",
            ["run"],
        ),
        "rate": _gauge(
            "pixelmill_run_images_per_second",
            f"Images made per second over the last {int(RATE_WINDOW.total_seconds())} s, or "
            "since the run's first image when that is more recent.",
            ["run"],
        ),
        "finish": _gauge(
            "pixelmill_run_projected_finish_timestamp_seconds",
            "When the run's open jobs will be done at the recent rate (absent while nothing is "
            "made).",
            ["run"],
        ),
        "due": _gauge(
            "pixelmill_run_deadline_timestamp_seconds",
            "When the run should be finished (created + PIXELMILL_RUN_DEADLINE_HOURS).",
            ["run"],
        ),
        "backlog": _gauge(
            "pixelmill_review_backlog_items", "Items of a run waiting for a reviewer.", ["run"]
        ),
        "reviewed": _gauge("pixelmill_run_images_reviewed", "Images with a decision.", ["run"]),
        "kept": _gauge("pixelmill_run_images_kept", "Images kept by reviewers.", ["run"]),
        "keep_ratio": _gauge(
            "pixelmill_run_keep_ratio", "Kept over reviewed images (absent before any).", ["run"]
        ),
    }


def _add_run(
    families: dict[str, GaugeMetricFamily], run: RunFigures, now: datetime, deadline: timedelta
) -> None:
    label = [run.name]
    families["active"].add_metric(label, 1 if run.active else 0)
    for status in JobStatus:
        families["jobs"].add_metric([run.name, status.value], run.jobs.get(status, 0))
    families["images"].add_metric(label, run.images)
    families["planned"].add_metric(label, run.images_planned)
    families["remaining"].add_metric(label, run.remaining_images)
    families["rate"].add_metric(label, run.images_per_second)
    projected = run.projected_finish(now)
    if projected is not None:
        families["finish"].add_metric(label, projected.timestamp())
    families["due"].add_metric(label, (run.created_at + deadline).timestamp())
    families["backlog"].add_metric(label, run.review_backlog)
    families["reviewed"].add_metric(label, run.reviewed)
    families["kept"].add_metric(label, run.kept)
    if run.reviewed:
        families["keep_ratio"].add_metric(label, run.kept / run.reviewed)


class DatabaseCollector:
    """A prometheus-client collector that reads the database on every ``collect()``."""

    def __init__(self, engine: Engine, *, deadline: timedelta) -> None:
        self._engine = engine
        self._deadline = deadline

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        up = _gauge("pixelmill_exporter_database_up", "1 if the last scrape read the database.")
        try:
            with Session(self._engine) as session, session.begin():
                if self._engine.dialect.name == "postgresql":
                    session.execute(text("SET TRANSACTION READ ONLY"))
                    session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
                snapshot = read_snapshot(session)
        except Exception:  # reported as a metric, so Prometheus sees a database outage
            log.exception("exporter: reading the database failed")
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            yield from snapshot_metrics(snapshot, self._deadline)
        seconds = _gauge(
            "pixelmill_exporter_scrape_duration_seconds", "Seconds the last scrape took."
        )
        seconds.add_metric([], time.monotonic() - started)
        yield seconds


def exporter_registry(engine: Engine, *, deadline: timedelta) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(engine, deadline=deadline))
    return registry
