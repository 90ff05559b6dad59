"""`pixelmill dispatch`: publish pending jobs to the broker, once or on a timer.

Watching (``--watch``), the dispatcher outlives its broker and its database: a round that
fails because either is unreachable is reported on one line, counted
(pixelmill_dispatch_outages_total) and tried again after a pause that doubles while the
outage lasts; the jobs whose publish failed went back to pending in that round already.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from cli import common
from cli.common import console, err
from pixelmill.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

# The pauses of a watching dispatcher after a failed round: doubling up to this many seconds.
OUTAGE_PAUSE_MAX_SECONDS = 10.0


def dispatch_once(
    settings: Settings,
    run_id: int | None = None,
    *,
    quiet: bool = False,
    celery: Celery | None = None,
) -> None:
    """Return the jobs of dead workers to the queue, then top up the broker's window (only
    jobs of run ``run_id`` if given) over ``celery`` (a publisher app, made if None)."""
    from pixelmill.outages import RetryBackoff
    from pixelmill.tasks import publisher_app
    from producer import metrics
    from producer.dispatch import celery_broker_count, celery_publisher
    from producer.dispatch import dispatch as dispatch_jobs
    from worker.claim import reap_expired

    celery = celery if celery is not None else publisher_app(settings)
    with common.sessions(settings)() as session:
        # Jobs whose worker died (lease expired) go back to pending (published again after
        # their backoff), or dead after max_attempts (cancelled in a cancelled run), before
        # the window is topped up.
        reaped = reap_expired(
            session,
            max_attempts=settings.max_attempts,
            backoff=RetryBackoff.from_settings(settings),
        )
        metrics.count_reaped(
            requeued=len(reaped.requeued), dead=len(reaped.dead), cancelled=len(reaped.cancelled)
        )
        if reaped.requeued or reaped.dead or reaped.cancelled:
            err.print(
                f"re-queued {len(reaped.requeued)} jobs whose worker stopped; "
                f"{len(reaped.dead)} out of attempts are dead; "
                f"{len(reaped.cancelled)} of cancelled runs are cancelled"
            )
        report = dispatch_jobs(
            session,
            celery_publisher(celery, settings.render_queue),
            requeue_after=timedelta(seconds=settings.requeue_after_seconds),
            run_id=run_id,
            window=settings.dispatch_window,
            broker_count=celery_broker_count(celery, settings.render_queue),
        )
    if not quiet:
        console.print(f"published {report.published} jobs, re-published {report.republished}")


def dispatch(
    watch: Annotated[
        float | None,
        typer.Option(min=0.1, max=86_400, help="Keep dispatching every WATCH seconds."),
    ] = None,
) -> None:
    """Publish pending jobs (and re-publish queued jobs whose message was lost)."""
    settings = common.settings()
    if watch is not None and settings.dispatch_metrics_port:
        # A long-running dispatcher serves its counters (PIXELMILL_DISPATCH_METRICS_PORT).
        from pixelmill.metrics_server import start_metrics_server

        start_metrics_server(settings.dispatch_metrics_port)
    if watch is None:
        dispatch_once(settings)
        return
    watch_dispatch(settings, every=watch)


def watch_dispatch(settings: Settings, *, every: float) -> NoReturn:
    """Dispatch every ``every`` seconds, for ever, riding out outages of the database and the
    broker; any other error ends the command."""
    from pixelmill.outages import (
        BROKER,
        DATABASE,
        OutageBackoff,
        RetryBackoff,
        infrastructure_error,
    )
    from pixelmill.tasks import publisher_app
    from producer import metrics

    celery = publisher_app(settings)  # one connection pool for every round
    outages = OutageBackoff(RetryBackoff(base=min(1.0, every), cap=OUTAGE_PAUSE_MAX_SECONDS))
    while True:
        try:
            dispatch_once(settings, celery=celery)
        except Exception as exc:
            outage = infrastructure_error(exc)
            if outage is None:
                raise
            service = getattr(outage, "service", None)
            metrics.OUTAGES.labels(service if service in (BROKER, DATABASE) else "other").inc()
            pause = outages.failed()
            err.print(f"dispatch: {outage}; trying again in {pause:.1f} s")
            time.sleep(pause)
            continue
        if failed := outages.succeeded():
            err.print(f"dispatch: back after {failed} failed rounds")
        metrics.LAST_ROUND.set_to_current_time()
        time.sleep(every)
