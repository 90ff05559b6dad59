"""What a run has done so far (jobs by status, images made, failures with their errors, what
its keepers cost: db.keeper_costs), and the polling loop behind `pixelmill status RUN --watch`."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.keeper_costs import RunCosts, json_array_length, run_costs
from db.models import OPEN_JOB_STATUSES, Image, Job, JobStatus, Run


@dataclass
class RunStatusReport:
    run_id: int
    name: str
    status: str
    jobs: dict[str, int]
    images: int
    images_planned: int
    failures: list[tuple[int, str]] = field(default_factory=list)
    costs: RunCosts | None = None  # None when not asked for (the live progress bar)

    @property
    def total_jobs(self) -> int:
        return sum(self.jobs.values())

    @property
    def finished(self) -> bool:
        """Nothing left to do: no job waits or runs."""
        return not any(self.jobs.get(s, 0) for s in OPEN_JOB_STATUSES)


def run_status(
    session: Session, run: Run, *, max_failures: int = 20, costs: bool = True
) -> RunStatusReport:
    counts = session.execute(
        select(Job.status, func.count()).where(Job.run_id == run.id).group_by(Job.status)
    )
    jobs = {job_status: count for job_status, count in counts}
    images = session.scalar(select(func.count(Image.id)).join(Job).where(Job.run_id == run.id))
    # Counted in the database: a run can have a million jobs.
    array_length = (
        func.jsonb_array_length
        if session.get_bind().dialect.name == "postgresql"
        else func.json_array_length
    )
    # Seeds early stop left unrendered (skipped_seeds) are not planned images: never missing.
    planned = session.scalar(
        select(
            func.coalesce(func.sum(array_length(Job.seeds)), 0)
            - func.coalesce(func.sum(json_array_length(session, Job.skipped_seeds)), 0)
        ).where(Job.run_id == run.id)
    )
    failures = session.execute(
        select(Job.id, Job.error)
        .where(
            Job.run_id == run.id,
            Job.status.in_([JobStatus.FAILED, JobStatus.DEAD, JobStatus.BLOCKED]),
        )
        .order_by(Job.id)
        .limit(max_failures)
    ).all()
    return RunStatusReport(
        run_id=run.id,
        name=run.name,
        status=run.status,
        jobs=jobs,
        images=images or 0,
        images_planned=int(planned or 0),
        failures=[(job_id, error or "") for job_id, error in failures],
        costs=run_costs(session, run.id) if costs else None,
    )


# --- live progress (`pixelmill status RUN --watch`) ------------------------------------------


@dataclass
class ProgressRate:
    """Images per second over the last ``window`` seconds of samples, and the ETA it gives.

    A moving window, not the run's average: after a pause, a GPU added or lost, the rate and
    the ETA follow what is happening now."""

    window: float = 300.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, at: float, images: int) -> None:
        self.samples.append((at, images))
        while len(self.samples) > 2 and at - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def per_second(self) -> float | None:
        """None until two samples some time apart exist."""
        if len(self.samples) < 2:
            return None
        (first_at, first), (last_at, last) = self.samples[0], self.samples[-1]
        if last_at <= first_at:
            return None
        return max(0, last - first) / (last_at - first_at)

    def eta_seconds(self, remaining: int) -> float | None:
        """Seconds until ``remaining`` more images at the current rate (0 when none remain;
        None while the rate is unknown or zero)."""
        if remaining <= 0:
            return 0.0
        rate = self.per_second()
        if not rate:
            return None
        return remaining / rate


def watch_run(
    sessions: Callable[[], Session],
    run_id: int,
    *,
    interval: float,
    show: Callable[[RunStatusReport, ProgressRate], None],
    rate: ProgressRate | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RunStatusReport:
    """Poll run ``run_id`` every ``interval`` seconds, calling ``show`` after each poll, until
    no job of it is pending, queued or running; returns the last report."""
    rate = rate if rate is not None else ProgressRate()
    while True:
        with sessions() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise LookupError(f"run {run_id} no longer exists")
            report = run_status(session, run, max_failures=0, costs=False)
        rate.add(clock(), report.images)
        show(report, rate)
        if report.finished:
            return report
        sleep(interval)
