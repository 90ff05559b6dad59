"""Outages of the services, with real processes: the watching dispatcher (``pixelmill dispatch
--watch``, the real command) outlives its broker and its database, and jobs that only wait
their turn on the broker behind long jobs are not published again and again.

Each test ends with :func:`faults.assert_consistent`: every job done, one image row per
(job, seed), every row's object stored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess
from tests.integration.faults import (
    JobSpec,
    Rig,
    all_ended,
    assert_consistent,
    insert_jobs,
    mid_render_job,
)
from tests.integration.outages import (
    DatabaseProxy,
    WatchingDispatcher,
    drop_database_connections,
    rabbitmq_to_restart,
)

pytestmark = pytest.mark.integration

StartWorker = Callable[[dict[str, str], str], WorkerProcess]
SETTLE = 150  # seconds for a faulted run to end, on a slow shared 2-core machine


def test_the_watching_dispatcher_outlives_its_broker_and_its_database(
    make_rig: Callable[..., Rig],
    tmp_path: Path,
    fresh_database_url: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: StartWorker,
) -> None:
    """Mid-render, the broker is away for eight seconds (while a new run's jobs wait to be
    published), then the database:
    every connection dropped and the dispatcher cut off from it for five seconds. The
    dispatcher logs each outage, counts it, waits and carries on; jobs whose publish failed
    go back to pending at once; the run finishes."""
    queue = f"render-{uuid.uuid4().hex[:8]}"
    with rabbitmq_to_restart() as rabbit:
        proxy = DatabaseProxy(fresh_database_url)
        # A window with room: the jobs of a run produced during the outage are queued
        # (then returned) at once.
        rig = make_rig(broker_url=rabbit.url, queue=queue, s3=s3_settings, dispatch_window="8")
        spec = JobSpec(str(tiny_model_dir), seeds=(1, 2, 3, 4))
        ids = insert_jobs(rig.engine, [spec] * 5)
        worker = start_worker(rig.env(), queue)
        env = {**rig.env(), "PIXELMILL_DATABASE_URL": proxy.url}
        dispatcher = WatchingDispatcher(env, tmp_path / "dispatch.log")
        workers = [worker]
        try:
            mid_render_job(rig, workers)

            rabbit.stop_app()
            ids += insert_jobs(rig.engine, [spec] * 2)
            time.sleep(8)
            assert dispatcher.alive(), dispatcher.output()
            rabbit.start_app()
            back = time.time()
            # Back at work (its pause after the last failed round is over) before the next.
            rig.wait_until(
                lambda: dispatcher.metric("pixelmill_dispatch_last_round_timestamp_seconds") > back,
                timeout=30,
                what="the dispatcher to carry on",
                workers=workers,
            )

            drop_database_connections(fresh_database_url)
            proxy.cut()
            time.sleep(5)
            assert dispatcher.alive(), dispatcher.output()
            proxy.restore()

            rig.wait_until(
                lambda: all_ended(rig.engine), timeout=SETTLE, what="the run", workers=workers
            )
            assert dispatcher.alive(), dispatcher.output()
            outages = {
                service: dispatcher.metric("pixelmill_dispatch_outages_total", service=service)
                for service in ("broker", "database")
            }
            unpublished = dispatcher.metric("pixelmill_jobs_unpublished_total")
        finally:
            dispatcher.stop()
            proxy.close()
    log = dispatcher.output()
    assert outages["broker"] >= 1 and outages["database"] >= 1, (outages, log)
    assert "broker unreachable" in log and "database unreachable" in log, log
    assert "trying again in" in log and "Traceback" not in log, log
    # A job queued as the broker went away was returned to pending, not left to wait.
    assert unpublished >= 1, log
    jobs = assert_consistent(rig, attempts=dict.fromkeys(ids, (1, 2, 3)))
    # No attempt spent: a connection dropped mid-write is an outage, not the job's fault.
    assert {job_id: row.attempts - row.outages for job_id, row in jobs.items()} == dict.fromkeys(
        ids, 1
    )


@pytest.mark.parametrize("broker_url", ["redis", "rabbitmq"], indirect=True)
def test_jobs_waiting_behind_long_jobs_are_not_published_again(
    make_rig: Callable[..., Rig],
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: StartWorker,
) -> None:
    """Each job renders longer than the requeue time, and four wait on the broker behind the
    one rendering: their messages are there, so none is published again (before, every
    round re-published the stale ones and the worker skipped the duplicates)."""
    rig = make_rig(
        broker_url=broker_url, queue=render_queue, s3=s3_settings,
        requeue_after_seconds="2", dispatch_window="4",
    )  # fmt: skip
    worker = start_worker(rig.env(), render_queue)
    with rig.dispatcher() as dispatcher:
        # A first job warms the worker up: a message it takes while it still starts (its
        # pool process loading the model) is neither on the broker nor its job running, and
        # could be published again once (no harm, and not what this test is about).
        (warm_up,) = insert_jobs(rig.engine, [JobSpec(str(tiny_model_dir), seeds=(1,))])
        rig.wait_until(
            lambda: all_ended(rig.engine), timeout=SETTLE, what="a first job", workers=[worker]
        )
        rounds, log_size = len(dispatcher.reports), worker.log_path.stat().st_size
        long_job = JobSpec(str(tiny_model_dir), seeds=tuple(range(1, 9)), steps=6)
        ids = insert_jobs(rig.engine, [long_job] * 5)
        rig.wait_until(
            lambda: all_ended(rig.engine), timeout=SETTLE, what="the run", workers=[worker]
        )
    reports = dispatcher.reports[rounds:]
    assert sum(report.republished for report in reports) == 0, reports
    assert max(report.still_held for report in reports) >= 1  # it was put to the test
    worker.output()  # flushes its log
    with worker.log_path.open("rb") as log:
        log.seek(log_size)
        assert b"'skipped'" not in log.read()  # no duplicate delivered
    assert_consistent(rig, attempts=dict.fromkeys([warm_up, *ids], 1))
