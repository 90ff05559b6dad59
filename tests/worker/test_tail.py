"""A job's tail (last uploads, rows, done) finishing in the background: the job stays running
under its lease until the tail commits, and a failing tail gives the job back."""

from __future__ import annotations

import pathlib
import signal
import threading
import time

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from db.models import JobStatus
from pixelmill.settings import Settings
from pixelmill.storage import LocalStorage
from tests.worker.support import images_of, make_job, make_settings, reload_job
from worker.loading import PipelineCache
from worker.render import DEFERRED, WorkerRuntime, render_job
from worker.tail import JobTails


class GatedStorage(LocalStorage):
    """Local storage whose uploads wait for ``gate`` (and fail while ``fail`` is set)."""

    def __init__(self, root: pathlib.Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.fail = False

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        if self.fail:
            raise ConnectionError("storage is down")
        super().put(key, data, content_type=content_type)


@pytest.fixture
def gated(tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> tuple[Settings, GatedStorage]:
    settings = make_settings(tiny_model_dir, tmp_path)
    return settings, GatedStorage(settings.resolved_storage_dir)


def runtime_with(
    settings: Settings, storage: GatedStorage, sessions: sessionmaker[Session]
) -> WorkerRuntime:
    return WorkerRuntime(
        settings=settings,
        sessions=sessions,
        storage=storage,
        pipelines=PipelineCache(device=torch.device("cpu")),
        name="tail-worker",
    )


def test_a_deferred_job_stays_running_until_its_tail_commits_done(
    gated: tuple[Settings, GatedStorage],
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
) -> None:
    settings, storage = gated
    runtime = runtime_with(settings, storage, pg_sessions)
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[5, 6])

    assert render_job(runtime, job.id, defer_tail=True) == DEFERRED

    # Rendered, but its images are still uploading: not done, no rows, lease held.
    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.RUNNING and row.lease_expires_at is not None
    assert images_of(db_session, job.id) == []
    storage.gate.set()
    assert runtime.tails.wait(timeout=60) == "done"
    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.DONE and row.lease_expires_at is None
    assert [image.seed for image in images_of(db_session, job.id)] == [5, 6]
    for image in images_of(db_session, job.id):
        assert storage.exists(image.storage_key)


def test_a_failing_tail_gives_the_job_back_for_another_attempt(
    gated: tuple[Settings, GatedStorage],
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
) -> None:
    settings, storage = gated
    runtime = runtime_with(settings, storage, pg_sessions)
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[7])
    storage.fail = True

    assert render_job(runtime, job.id, defer_tail=True) == DEFERRED
    storage.gate.set()
    assert runtime.tails.wait(timeout=60) == "retry"

    row = reload_job(db_session, job.id)
    assert row.status == JobStatus.PENDING and row.attempts == 1
    assert row.error is not None and "storage is down" in row.error
    assert images_of(db_session, job.id) == []


def test_one_tail_at_a_time_in_order() -> None:
    tails = JobTails()
    events: list[str] = []

    def finish(name: str, seconds: float) -> str:
        events.append(f"{name} start")
        time.sleep(seconds)
        events.append(f"{name} end")
        return name

    tails.defer(lambda: finish("first", 0.2))
    tails.defer(lambda: finish("second", 0.0))  # waits for the first to end
    assert events[:2] == ["first start", "first end"]
    assert tails.wait(timeout=10) == "second"
    assert events == ["first start", "first end", "second start", "second end"]
    assert tails.wait() is None  # nothing in flight


def test_a_tail_that_raises_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    tails = JobTails()

    def broken() -> str:
        raise RuntimeError("a bug in a tail")

    tails.defer(broken)
    assert tails.wait(timeout=10) is None
    assert "a job's tail failed" in caplog.text
    assert "a bug in a tail" in caplog.text


class SoftTimeLimit(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded (an Exception raised by a signal)."""


def test_a_time_limit_while_waiting_ends_the_task_and_the_tail_is_kept() -> None:
    tails = JobTails()
    release = threading.Event()
    tails.defer(lambda: "first" if release.wait(30) else "never released")

    def interrupt(signum: int, frame: object) -> None:
        raise SoftTimeLimit

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(SoftTimeLimit):
            tails.defer(lambda: "second")  # waits for the first: interrupted there
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    release.set()
    assert tails.wait(timeout=10) == "first"  # still tracked, drained as before


def test_an_overdue_tail_gives_its_job_up() -> None:
    tails = JobTails()
    release = threading.Event()
    overdue = threading.Event()
    tails.defer(lambda: "late" if release.wait(30) else "never", deadline=0.2, overdue=overdue.set)
    assert overdue.wait(10)  # e.g. the heartbeat stops, so the lease can expire
    release.set()
    assert tails.wait(timeout=10) == "late"

    # A tail that ends in time never calls it.
    called = threading.Event()
    tails.defer(lambda: "quick", deadline=0.5, overdue=called.set)
    assert tails.wait(timeout=10) == "quick"
    time.sleep(0.8)
    assert not called.is_set()
