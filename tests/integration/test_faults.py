"""Faults with real processes: Celery workers, Redis/RabbitMQ, Postgres and a moto S3 server,
killed, frozen and restarted mid-run. Each test ends with :func:`faults.assert_consistent`:
every job ended, one image row per (job, seed), every row's object stored, attempts as the
fault explains.

Timings are tight (10 s leases) so each fault heals in seconds; renders
are the tiny model at 64x64, a few steps, one seed per pipeline call.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, utcnow
from pixelmill.tasks import RENDER_TASK
from tests.conftest import WorkerProcess
from tests.integration.faults import (
    FrozenProcesses,
    JobSpec,
    PrivateRedis,
    PrivateS3,
    Rig,
    all_ended,
    assert_consistent,
    assert_was_mid_render,
    image_count,
    insert_jobs,
    job,
    mid_render_job,
    the_pool_pid,
    wait_for_log,
)
from tests.integration.outages import rabbitmq_to_restart
from worker.celery_app import create_app

pytestmark = pytest.mark.integration

StartWorker = Callable[[dict[str, str], str], WorkerProcess]
SETTLE = 150  # seconds for a faulted run to end, on a slow shared 2-core machine

# Celery logs each task's return value (render_job's outcome) at INFO.
DONE = "succeeded in"


# --- a worker's pool process killed mid-render ---------------------------------------------


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_pool_process_killed_mid_render(
    make_rig: Callable[..., Rig],
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: StartWorker,
) -> None:
    rig = make_rig(broker_url=broker_url, queue=render_queue, s3=s3_settings)
    ids = insert_jobs(rig.engine, [JobSpec(str(tiny_model_dir), seeds=(1, 2, 3, 4))] * 3)
    worker = start_worker(rig.env(), render_queue)
    with rig.dispatcher():
        victim = mid_render_job(rig, [worker])
        pool = the_pool_pid(worker)
        os.kill(pool, signal.SIGKILL)
        assert_was_mid_render(rig, victim)
        # Celery forks a new pool process; the job resumes once its lease ran out.
        rig.wait_until(
            lambda: all_ended(rig.engine), timeout=SETTLE, what="the run", workers=[worker]
        )
    assert the_pool_pid(worker) != pool
    assert_consistent(rig, attempts={i: 2 if i == victim else 1 for i in ids})


# --- the whole worker killed, another started ----------------------------------------------


@pytest.mark.parametrize("broker_url", ["redis", "rabbitmq"], indirect=True)
def test_whole_worker_killed_and_restarted(
    make_rig: Callable[..., Rig],
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: StartWorker,
) -> None:
    """Redis keeps the dead worker's unacknowledged message for its visibility timeout (hours)
    and RabbitMQ gives it back at once: either way the job resumes after its lease."""
    rig = make_rig(broker_url=broker_url, queue=render_queue, s3=s3_settings)
    ids = insert_jobs(rig.engine, [JobSpec(str(tiny_model_dir), seeds=(1, 2, 3, 4))] * 3)
    first = start_worker(rig.env(), render_queue)
    with rig.dispatcher():
        victim = mid_render_job(rig, [first])
        pool = the_pool_pid(first)
        # As a host crash would: the main process and its pool process at once.
        first.process.kill()
        os.kill(pool, signal.SIGKILL)
        first.process.wait(10)
        assert_was_mid_render(rig, victim)
        second = start_worker(rig.env(), render_queue)
        rig.wait_until(
            lambda: all_ended(rig.engine), timeout=SETTLE, what="the run", workers=[second]
        )
    assert_consistent(rig, attempts={i: 2 if i == victim else 1 for i in ids})


# --- the same job id delivered twice at once -----------------------------------------------


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_same_job_delivered_twice_at_once(
    make_rig: Callable[..., Rig],
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: StartWorker,
) -> None:
    rig = make_rig(broker_url=broker_url, queue=render_queue, s3=s3_settings)
    (job_id,) = insert_jobs(rig.engine, [JobSpec(str(tiny_model_dir), seeds=(1, 2))])
    workers = [start_worker(rig.env(), render_queue) for _ in range(2)]
    for worker in workers:
        wait_for_log(worker, "ready.", timeout=120)
        the_pool_pid(worker)
    # What the dispatcher does, then a duplicate (a re-publish, a redelivery) right behind it.
    with Session(rig.engine) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status=JobStatus.QUEUED, queued_at=utcnow())
        )
        session.commit()
    app = create_app(rig.settings)
    with app.producer_or_acquire() as producer:
        for _ in range(2):
            app.send_task(RENDER_TASK, args=[job_id], queue=render_queue, producer=producer)
    app.close()

    rig.wait_until(lambda: all_ended(rig.engine), timeout=SETTLE, what="the job", workers=workers)
    for worker in workers:  # each worker took one of the two messages
        wait_for_log(worker, DONE, timeout=60)
    # The task that rendered answers 'deferred' (its tail, then done, finish in the
    # background: worker.tail); the other found the job taken.
    outcomes = sorted(
        "rendered"
        if ": 'deferred'" in worker.output()
        else "skipped"
        if ": 'skipped'" in worker.output()
        else worker.output()
        for worker in workers
    )
    assert outcomes == ["rendered", "skipped"]
    assert_consistent(rig, attempts={job_id: 1})


# --- the broker restarted under a rendering worker -----------------------------------------


@contextlib.contextmanager
def broker_to_restart(
    kind: str, tmp_path: Path
) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """(url, stop, start) of a broker the test may restart: a private Redis (no persistence:
    its messages are lost, as with a crashed broker host) or a RabbitMQ node (durable queue,
    persistent messages: the unacknowledged one is given out again)."""
    if kind == "redis":
        redis = PrivateRedis(tmp_path / "redis.log")
        redis.start()
        try:
            yield redis.url, redis.kill, redis.start
        finally:
            redis.stop()
    else:
        with rabbitmq_to_restart() as rabbit:
            yield rabbit.url, rabbit.stop_app, rabbit.start_app


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_broker_restarted_under_a_rendering_worker(
    make_rig: Callable[..., Rig],
    tmp_path: Path,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: StartWorker,
    kind: str,
) -> None:
    """The broker goes away for a few seconds while a job renders. The render is not
    cancelled: the job finishes on its first attempt under its fenced claim (Postgres was up),
    so no GPU work is lost and no job waits out its lease. The worker reconnects; RabbitMQ
    gives the job's message out again and it finds the job running or done; what Redis lost
    the dispatcher publishes again."""
    queue = f"render-{uuid.uuid4().hex[:8]}"
    with broker_to_restart(kind, tmp_path) as (url, stop_broker, start_broker):
        rig = make_rig(broker_url=url, queue=queue, s3=s3_settings, requeue_after_seconds="6")
        ids = insert_jobs(rig.engine, [JobSpec(str(tiny_model_dir), seeds=(1, 2, 3, 4, 5))] * 3)
        worker = start_worker(rig.env(), queue)
        with rig.dispatcher():
            victim = mid_render_job(rig, [worker])
            stop_broker()
            assert_was_mid_render(rig, victim)
            time.sleep(4)  # the worker and the dispatcher notice and retry
            start_broker()
            rig.wait_until(
                lambda: all_ended(rig.engine), timeout=SETTLE, what="the run", workers=[worker]
            )
    output = worker.output()
    assert "Connection to broker lost" in output  # the fault did reach the worker
    assert "Terminating it instead" not in output  # ... and did not cancel the render
    # Every job rendered once, the one in flight included.
    assert_consistent(rig, attempts=dict.fromkeys(ids, 1))
    if kind == "rabbitmq":
        # Its message, unacknowledged when the connection dropped, came back and was dropped.
        wait_for_log(worker, "'skipped'", timeout=30)


# --- S3 stopped mid-run, then started again -------------------------------------------------


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_storage_stopped_mid_run_then_started(
    make_rig: Callable[..., Rig],
    broker_url: str,
    render_queue: str,
    tiny_model_dir: Path,
    start_worker: StartWorker,
) -> None:
    """S3 away for 20 s. Uploads fail; the jobs are given back with a growing pause between
    tries, and these outages are not counted: with two attempts allowed, none dies."""
    s3 = PrivateS3()
    s3.start()
    try:
        rig = make_rig(
            broker_url=broker_url,
            queue=render_queue,
            s3=s3.settings(),
            max_attempts="2",
            retry_backoff_seconds="2",
            retry_backoff_max_seconds="8",
        )
        ids = insert_jobs(rig.engine, [JobSpec(str(tiny_model_dir), seeds=(1, 2, 3))] * 3)
        worker = start_worker(rig.env(), render_queue)
        with rig.dispatcher():
            mid_render_job(rig, [worker])
            s3.stop()
            # Rows follow their objects: none can be recorded while storage is down.
            time.sleep(1.5)
            during = image_count(rig.engine)
            time.sleep(18.5)
            assert image_count(rig.engine) == during
            assert not all_ended(rig.engine)
            s3.start()
            rig.wait_until(
                lambda: all_ended(rig.engine), timeout=SETTLE, what="the run", workers=[worker]
            )
        # Tried again after a pause (at most a few tries in 20 s, not one per dispatcher
        # round), never more than one image row per seed, and no attempt spent on the outage.
        jobs = assert_consistent(rig, attempts={i: tuple(range(1, 9)) for i in ids})
        assert {
            job_id: row.attempts - row.outages for job_id, row in jobs.items()
        } == dict.fromkeys(ids, 1)
        assert sum(row.outages for row in jobs.values()) >= 1
    finally:
        s3.stop()


# --- a poison job ----------------------------------------------------------------------------


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_poison_job_ends_dead_without_blocking_the_others(
    make_rig: Callable[..., Rig],
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    tmp_path: Path,
    start_worker: StartWorker,
) -> None:
    """A job naming a model folder whose weights are corrupt (a half-copied checkpoint):
    it passes every check before rendering, and loading it fails the same way every time."""
    corrupt = tmp_path / "half-copied-model"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    rig = make_rig(broker_url=broker_url, queue=render_queue, s3=s3_settings)
    good = JobSpec(str(tiny_model_dir), seeds=(1, 2))
    poison, *others = insert_jobs(
        rig.engine, [JobSpec(str(corrupt), seeds=(1, 2)), good, good, good]
    )
    worker = start_worker(rig.env(), render_queue)
    with rig.dispatcher():
        rig.wait_until(
            lambda: all_ended(rig.engine), timeout=SETTLE, what="the run", workers=[worker]
        )
    jobs = assert_consistent(
        rig,
        attempts={poison: 3, **dict.fromkeys(others, 1)},
        statuses={poison: JobStatus.DEAD},
    )
    assert jobs[poison].error is not None
    assert "diffusion_pytorch_model.safetensors" in jobs[poison].error
    assert image_count(rig.engine, poison) == 0
    # The others did not wait for the poison job to die: one finished before its last try.
    assert min(jobs[i].finished_at for i in others) < jobs[poison].finished_at  # type: ignore[operator]


# --- a lease expiring while its worker still runs ------------------------------------------


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_lease_expires_while_the_first_worker_still_runs(
    make_rig: Callable[..., Rig],
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: StartWorker,
    frozen: FrozenProcesses,
) -> None:
    """The first worker's pool process is frozen (SIGSTOP: a stalled host, a long GC pause)
    longer than the lease; a second worker takes the job over and finishes it. Thawed, the
    first worker carries on with what it had in hand: its late results must not be
    recorded a second time, nor its outcome overwrite the second worker's."""
    rig = make_rig(broker_url=broker_url, queue=render_queue, s3=s3_settings)
    (job_id,) = insert_jobs(rig.engine, [JobSpec(str(tiny_model_dir), seeds=(1, 2, 3, 4))])
    first = start_worker(rig.env(), render_queue)
    with rig.dispatcher():
        mid_render_job(rig, [first])
        stalled = the_pool_pid(first)
        frozen.freeze(stalled)
        assert_was_mid_render(rig, job_id)
        first_owner = job(rig.engine, job_id).worker
        second = start_worker(rig.env(), render_queue)
        rig.wait_until(
            lambda: job(rig.engine, job_id).status == JobStatus.DONE,
            timeout=SETTLE,
            what="the second worker to finish the job",
            workers=[second],
        )
        images_before_thaw = image_count(rig.engine, job_id)
        frozen.thaw(stalled)
        wait_for_log(first, "'skipped'", timeout=60)  # it noticed it lost the job
    row = job(rig.engine, job_id)
    assert row.worker != first_owner  # the second worker's outcome stands
    assert image_count(rig.engine, job_id) == images_before_thaw == 4
    assert_consistent(rig, attempts={job_id: 2})
