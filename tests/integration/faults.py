"""Helpers of the fault tests: jobs inserted directly, a dispatcher thread, a private Redis, a
private moto S3 server, the pool process of a worker, and the check every fault test ends with.

The check (:func:`assert_consistent`) is what "results exactly once" means: every job ended
(none left pending, queued or running), every seed of a done job has exactly one image row,
every row's object is in storage with the bytes its sha256 names, and each job was attempted
as often as the fault explains.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import Image, Job, JobStatus
from pixelmill.outages import RetryBackoff
from pixelmill.settings import Settings, get_settings
from producer.dispatch import DispatchReport, celery_broker_count, celery_publisher, dispatch
from tests.conftest import WorkerProcess, free_port, settings_env
from tests.factories import make_item, make_job, make_run
from worker.celery_app import create_app
from worker.claim import reap_expired

log = logging.getLogger(__name__)

OPEN_STATUSES = (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING)
ENDED_STATUSES = (JobStatus.DONE, JobStatus.DEAD, JobStatus.FAILED)

# Tight timings so faults heal within seconds: a lease of the minimum length (a lost worker's
# job is re-queued 10 s after its last heartbeat). Queued jobs whose message was lost are
# published again after 30 s (the broker test, which loses messages, shortens it).
FAULT_SETTINGS: dict[str, str | Path] = {
    "device": "cpu",
    "job_lease_seconds": "10",
    "requeue_after_seconds": "30",
    "max_attempts": "3",
    # Retries after a second or two (doubling up to 4 s), not the production quarter minute.
    "retry_backoff_seconds": "1",
    "retry_backoff_max_seconds": "4",
    "dispatch_window": "2",
    # One seed per pipeline call: rows appear seed by seed, so a fault can land mid-job.
    "render_batch_size": "1",
    "safety_checker": "false",
}


def worker_env(values: Mapping[str, str | Path]) -> dict[str, str]:
    """The environment of a worker process for ``values``. One torch thread: on a small, busy
    machine two spinning OpenMP threads per process make renders many times slower."""
    env = settings_env(dict(values))
    env["OMP_NUM_THREADS"] = "1"
    return env


# --- jobs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    model: str
    seeds: tuple[int, ...] = (1, 2, 3)
    steps: int = 4
    width: int = 64
    height: int = 64
    prompt: str = "product photo of a red canvas sneaker, white background"


def insert_jobs(engine: Engine, specs: list[JobSpec]) -> list[int]:
    """Pending jobs of one new run, as the producer would write them; their ids in order."""
    with Session(engine) as session:
        run = make_run(session, name=f"faults-{uuid.uuid4().hex[:10]}", source="fault test")
        ids = []
        for index, spec in enumerate(specs):
            item = make_item(
                session,
                source="fault test",
                external_key=f"SKU-{index}",
                fields={"title": spec.prompt},
                content_hash=hashlib.sha256(f"{run.name}/{index}".encode()).hexdigest(),
            )
            job = make_job(
                session,
                run,
                item=item,
                commit=False,
                prompt=f"{spec.prompt}, #{index}",
                model=spec.model,
                steps=spec.steps,
                guidance=7.0,
                width=spec.width,
                height=spec.height,
                seeds=spec.seeds,
                status=JobStatus.PENDING,
            )
            ids.append(job.id)
        session.commit()
    return ids


def jobs_by_id(engine: Engine) -> dict[int, Job]:
    with Session(engine, expire_on_commit=False) as session:
        return {job.id: job for job in session.scalars(select(Job).order_by(Job.id))}


def job(engine: Engine, job_id: int) -> Job:
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(Job, job_id)
        assert row is not None, f"job {job_id} does not exist"
        return row


def image_count(engine: Engine, job_id: int | None = None) -> int:
    query = select(func.count()).select_from(Image)
    if job_id is not None:
        query = query.where(Image.job_id == job_id)
    with Session(engine) as session:
        return int(session.scalar(query) or 0)


def all_ended(engine: Engine) -> bool:
    with Session(engine) as session:
        open_jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.status.in_(OPEN_STATUSES))
        )
        return open_jobs == 0


def running_with_images(engine: Engine) -> int | None:
    """A running job that has recorded some but not all of its images (it is mid-render)."""
    with Session(engine) as session:
        rows = session.execute(
            select(Job.id, Job.seeds, func.count(Image.id))
            .join(Image, Image.job_id == Job.id)
            .where(Job.status == JobStatus.RUNNING)
            .group_by(Job.id)
            .order_by(Job.id)
        ).all()
    for job_id, seeds, images in rows:
        if 0 < images < len(seeds):
            return int(job_id)
    return None


# --- the dispatcher -------------------------------------------------------------------------


class Dispatcher:
    """What ``pixelmill dispatch --watch`` does, every ``interval`` seconds, in a thread:
    re-queue (or bury) jobs whose lease expired (with their retry backoff), top up the broker
    window, re-publish queued jobs whose message the broker no longer holds. Errors (the
    broker is down) are recorded and retried on the next round. (tests/integration/outages.py
    runs the real command, for the tests of the dispatcher itself.)"""

    def __init__(self, settings: Settings, engine: Engine, *, interval: float = 0.5) -> None:
        self.settings = settings
        self.engine = engine
        self.interval = interval
        self.errors: list[str] = []
        self.rounds = 0
        self.reports: list[DispatchReport] = []
        self._stop = threading.Event()
        self._app = create_app(settings)
        self._thread = threading.Thread(target=self._run, name="test-dispatcher", daemon=True)

    def __enter__(self) -> Dispatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)
        with contextlib.suppress(Exception):
            self._app.close()

    @property
    def republished(self) -> int:
        return sum(report.republished for report in self.reports)

    def _run(self) -> None:
        publish = celery_publisher(self._app, self.settings.render_queue)
        broker_count = celery_broker_count(self._app, self.settings.render_queue)
        while not self._stop.is_set():
            try:
                with Session(self.engine) as session:
                    reap_expired(
                        session,
                        max_attempts=self.settings.max_attempts,
                        backoff=RetryBackoff.from_settings(self.settings),
                    )
                    report = dispatch(
                        session,
                        publish,
                        requeue_after=timedelta(seconds=self.settings.requeue_after_seconds),
                        window=self.settings.dispatch_window,
                        broker_count=broker_count,
                    )
                    self.reports.append(report)
            except Exception as exc:  # the broker is down: try again next round
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(self.interval)  # a round that failed at once is no faster
            self.rounds += 1
            self._stop.wait(self.interval)


# --- worker processes -----------------------------------------------------------------------


def pool_pids(worker: WorkerProcess) -> list[int]:
    """The pool (child) processes of a Celery worker: they run the tasks."""
    pid = worker.process.pid
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


def the_pool_pid(worker: WorkerProcess, *, timeout: float = 60) -> int:
    """The one pool process of a concurrency-1 worker (waits for it to be forked)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pool_pids(worker)
        if len(pids) == 1:
            return pids[0]
        time.sleep(0.1)
    raise AssertionError(f"worker has pool processes {pool_pids(worker)}:\n{worker.output()}")


def wait_for_log(worker: WorkerProcess, text: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in worker.output():
            return
        time.sleep(0.25)
    raise AssertionError(f"worker never logged {text!r}:\n{worker.output()}")


@dataclass
class FrozenProcesses:
    """Processes a test stopped (SIGSTOP): resumed and killed at teardown whatever happened,
    so none is left frozen."""

    pids: list[int] = field(default_factory=list)

    def freeze(self, pid: int) -> None:
        self.pids.append(pid)
        os.kill(pid, signal.SIGSTOP)

    def thaw(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def release_all(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


# --- private services -----------------------------------------------------------------------


def _wait_for_port(port: int, *, up: bool, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise AssertionError(f"port {port} did not go {'up' if up else 'down'} in {timeout} s")


class PrivateRedis:
    """A redis-server of the test's own (no persistence): killing it loses every message,
    as a broker host crash would. Never the shared one on 6379."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        _wait_for_port(self.port, up=True)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        _wait_for_port(self.port, up=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


class PrivateS3:
    """A moto S3 server of the test's own that can be stopped and started again on the same
    port (moto keeps its buckets in this process, so what was stored survives)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        _wait_for_port(self.port, up=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            _wait_for_port(self.port, up=False)

    def settings(self) -> dict[str, str]:
        bucket = f"pixelmill-faults-{uuid.uuid4().hex[:10]}"
        s3_client(self.endpoint).create_bucket(Bucket=bucket)
        return {
            "storage": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": self.endpoint,
            "s3_region": "us-east-1",
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        }


def s3_client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# --- the rig and the final check ------------------------------------------------------------


@dataclass
class Rig:
    """Everything a fault test runs against."""

    values: dict[str, str | Path]
    engine: Engine

    @property
    def settings(self) -> Settings:
        return get_settings(**self.values)

    def env(self) -> dict[str, str]:
        return worker_env(self.values)

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.settings, self.engine)

    def wait_until(
        self,
        condition: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        workers: list[WorkerProcess],
    ) -> None:
        """Like conftest.wait_for, for several workers: a worker that exits fails the test."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            for worker in workers:
                if worker.process.poll() is not None:
                    raise AssertionError(
                        f"worker exited ({worker.process.returncode}):\n{worker.output()}"
                    )
            time.sleep(0.2)
        logs = "\n---\n".join(worker.output()[-3000:] for worker in workers)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")


def mid_render_job(rig: Rig, workers: list[WorkerProcess]) -> int:
    """Wait for a job that is running and has recorded part of its seeds; its id."""
    found: list[int] = []

    def mid_render() -> bool:
        job_id = running_with_images(rig.engine)
        if job_id is not None:
            found.append(job_id)
        return job_id is not None

    rig.wait_until(mid_render, timeout=120, what="a job mid-render", workers=workers)
    return found[0]


def assert_was_mid_render(rig: Rig, job_id: int) -> None:
    """The fault landed while the job was still running (not after it finished)."""
    row = job(rig.engine, job_id)
    assert row.status == JobStatus.RUNNING and row.attempts == 1, (row.status, row.attempts)
    assert image_count(rig.engine, job_id) < len(row.seeds)


@contextlib.contextmanager
def disposing(engine: Engine) -> Iterator[Engine]:
    try:
        yield engine
    finally:
        engine.dispose()


def assert_consistent(
    rig: Rig,
    *,
    attempts: Mapping[int, int | tuple[int, ...]],
    statuses: Mapping[int, JobStatus] | None = None,
) -> dict[int, Job]:
    """Every job ended (``statuses``: done unless named), each done job has exactly one image
    row per seed, every row's object exists with the bytes its sha256 names, and each job's
    attempts are ``attempts[job]`` (a number, or a tuple of allowed numbers)."""
    settings = rig.settings
    client = s3_client(str(settings.s3_endpoint_url))
    jobs = jobs_by_id(rig.engine)
    assert set(jobs) == set(attempts), "attempts must name every job"
    with Session(rig.engine) as session:
        images = session.scalars(select(Image).order_by(Image.job_id, Image.seed)).all()
    seeds_recorded: dict[int, list[int]] = {job_id: [] for job_id in jobs}
    for image in images:
        seeds_recorded[image.job_id].append(image.seed)
        assert image.storage_key, f"job {image.job_id} seed {image.seed}: no object"
        body = client.get_object(Bucket=settings.s3_bucket, Key=image.storage_key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image.sha256, image.storage_key
        assert len(body) == image.bytes
    for job_id, row in jobs.items():
        expected_status = (statuses or {}).get(job_id, JobStatus.DONE)
        assert row.status == expected_status, (
            f"job {job_id} is {row.status} (expected {expected_status}); error: {row.error}"
        )
        assert row.lease_expires_at is None, f"job {job_id} still holds a lease"
        if expected_status == JobStatus.DONE:
            # Exactly one row per seed (the UNIQUE constraint forbids more; none missing).
            assert sorted(seeds_recorded[job_id]) == sorted(row.seeds), job_id
            assert row.error is None, f"job {job_id} is done but keeps error {row.error!r}"
        allowed = attempts[job_id]
        allowed = (allowed,) if isinstance(allowed, int) else allowed
        assert row.attempts in allowed, (
            f"job {job_id} had {row.attempts} attempts, expected {' or '.join(map(str, allowed))}"
        )
    return jobs
