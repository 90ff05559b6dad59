"""Delivery on real Postgres: attempts capped by max_attempts, retries of transient errors,
no retry of input errors, the reaper, and the heartbeat thread."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import torch
from botocore.exceptions import EndpointConnectionError
from sqlalchemy import create_engine, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job, JobStatus, RunStatus, utcnow
from pixelmill.storage import LocalStorage, Storage, StorageError
from tests.factories import make_job, make_run
from tests.worker.support import expire_lease, images_of, make_settings, reload
from tests.worker.support import make_job as make_render_job
from worker.claim import bury_exhausted, claim_job, extend_lease, reap_expired
from worker.heartbeat import Heartbeat
from worker.loading import PipelineCache
from worker.render import WorkerRuntime, render_job

LEASE = timedelta(minutes=30)


# --- claim, bury, reap --------------------------------------------------------------------


def test_claim_refuses_a_job_out_of_attempts_and_bury_makes_it_dead(db_session: Session) -> None:
    job = make_job(db_session)
    db_session.execute(
        update(Job).where(Job.id == job.id).values(attempts=3, error="CUDA out of memory")
    )
    db_session.commit()

    assert claim_job(db_session, job.id, worker="w", lease=LEASE, max_attempts=3) is None
    assert reload(db_session, job).status == JobStatus.QUEUED  # claim alone changes nothing

    assert bury_exhausted(db_session, job.id, max_attempts=3) is True

    row = reload(db_session, job)
    assert row.status == JobStatus.DEAD
    assert row.error == "CUDA out of memory"  # the last error is kept
    assert row.attempts == 3
    assert row.finished_at is not None
    assert row.run.status == RunStatus.FINISHED
    assert bury_exhausted(db_session, job.id, max_attempts=3) is False
    assert claim_job(db_session, job.id, worker="w", lease=LEASE, max_attempts=10) is None


def test_claim_within_attempts_is_allowed_and_bury_does_nothing(db_session: Session) -> None:
    job = make_job(db_session)
    db_session.execute(update(Job).where(Job.id == job.id).values(attempts=2))
    db_session.commit()
    assert bury_exhausted(db_session, job.id, max_attempts=3) is False
    claimed = claim_job(db_session, job.id, worker="w", lease=LEASE, max_attempts=3)
    assert claimed is not None and claimed.attempt == 3


def test_takeover_of_an_expired_lease_counts_against_max_attempts(db_session: Session) -> None:
    job = make_job(db_session)
    first = claim_job(db_session, job.id, worker="host:1:cpu", lease=LEASE, max_attempts=1)
    assert first is not None
    expire_lease(db_session, job.id)

    assert claim_job(db_session, job.id, worker="b", lease=LEASE, max_attempts=1) is None
    assert bury_exhausted(db_session, job.id, max_attempts=1) is True
    row = reload(db_session, job)
    assert row.status == JobStatus.DEAD
    assert row.error == "lease expired: worker host:1:cpu stopped during attempt 1"


def test_reaper_requeues_expired_jobs_and_buries_exhausted_ones(db_session: Session) -> None:
    run = make_run(db_session)
    live, retry, exhausted, queued = (make_job(db_session, run) for _ in range(4))
    for job in (live, retry, exhausted):
        assert claim_job(db_session, job.id, worker=f"w{job.id}", lease=LEASE) is not None
    expire_lease(db_session, retry.id)
    db_session.execute(update(Job).where(Job.id == exhausted.id).values(attempts=3))
    db_session.commit()
    expire_lease(db_session, exhausted.id)

    report = reap_expired(db_session, max_attempts=3)

    assert report.requeued == [retry.id]
    assert report.dead == [exhausted.id]
    row = reload(db_session, retry)
    assert row.status == JobStatus.PENDING
    assert row.lease_expires_at is None and row.queued_at is None
    assert row.error == f"lease expired: worker w{retry.id} stopped during attempt 1"
    row = reload(db_session, exhausted)
    assert row.status == JobStatus.DEAD
    assert row.error == f"lease expired: worker w{exhausted.id} stopped during attempt 3"
    assert row.finished_at is not None
    assert reload(db_session, live).status == JobStatus.RUNNING
    assert reload(db_session, queued).status == JobStatus.QUEUED
    # Nothing left to reap.
    assert reap_expired(db_session, max_attempts=3) == type(report)()
    # The re-queued job is claimable again, as attempt 2; the old owner is fenced off.
    again = claim_job(db_session, retry.id, worker="w2", lease=LEASE, max_attempts=3)
    assert again is not None and again.attempt == 2


def test_reaper_finishes_a_run_whose_last_job_dies(db_session: Session) -> None:
    run = make_run(db_session)
    job = make_job(db_session, run)
    assert claim_job(db_session, job.id, worker="w", lease=LEASE) is not None
    expire_lease(db_session, job.id)
    assert reap_expired(db_session, max_attempts=1).dead == [job.id]
    db_session.refresh(run)
    assert run.status == RunStatus.FINISHED


# --- render_job: retries and failures -----------------------------------------------------


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    return PipelineCache(device=torch.device("cpu"))


@pytest.fixture
def runtime_factory(
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    pipelines: PipelineCache,
) -> Callable[..., WorkerRuntime]:
    def make(storage: Storage | None = None, **settings: object) -> WorkerRuntime:
        values = make_settings(tiny_model_dir, tmp_path, **settings)
        return WorkerRuntime(
            settings=values,
            sessions=pg_sessions,
            storage=storage or LocalStorage(values.resolved_storage_dir),
            pipelines=pipelines,
            name="test-worker",
        )

    return make


class FlakyStorage:
    """Fails the first ``failures`` uploads, as an S3 outage would."""

    def __init__(self, inner: Storage, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageError("S3 is down")
        self.inner.put(key, data, content_type=content_type)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def url(self, key: str) -> str:
        return self.inner.url(key)


def _requeue(session: Session, job_id: int) -> None:
    """What the dispatcher does with a pending job: publish it (queued)."""
    session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.QUEUED))
    session.commit()


def test_transient_error_is_retried_and_resumes(
    runtime_factory: Callable[..., WorkerRuntime],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    storage = FlakyStorage(LocalStorage(tmp_path / "flaky"), failures=0)
    runtime = runtime_factory(storage=storage, max_attempts=3)
    job = make_render_job(db_session, model=str(tiny_model_dir), seeds=[1, 2, 3])

    # Seeds 1 and 3 are stored; storing seed 2's PNG fails once (uploads run concurrently,
    # so the failure is tied to a key, not to the order of calls).
    failed: list[str] = []
    original_put = storage.put

    def put(key: str, data: bytes, *, content_type: str) -> None:
        if key.endswith(".png") and "/2-" in key and not failed:
            failed.append(key)
            raise StorageError("S3 is down")
        original_put(key, data, content_type=content_type)

    storage.put = put  # type: ignore[method-assign]

    assert render_job(runtime, job.id) == "retry"

    row = reload(db_session, job)  # type: ignore[arg-type]
    assert row.status == JobStatus.PENDING
    assert row.error == "StorageError: S3 is down"
    assert row.attempts == 1
    assert row.lease_expires_at is None and row.finished_at is None
    # What was stored is kept: the retry renders only the missing seed.
    assert [image.seed for image in images_of(db_session, job.id)] == [1, 3]

    _requeue(db_session, job.id)
    assert render_job(runtime, job.id) == "done"
    row = reload(db_session, job)  # type: ignore[arg-type]
    assert row.status == JobStatus.DONE
    assert row.attempts == 2
    assert row.error is None
    assert [image.seed for image in images_of(db_session, job.id)] == [1, 2, 3]


def test_transient_error_on_the_last_attempt_makes_the_job_dead(
    runtime_factory: Callable[..., WorkerRuntime],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    storage = FlakyStorage(LocalStorage(tmp_path / "flaky"), failures=100)
    runtime = runtime_factory(storage=storage, max_attempts=2)
    job = make_render_job(db_session, model=str(tiny_model_dir), seeds=[1])

    assert render_job(runtime, job.id) == "retry"
    _requeue(db_session, job.id)
    assert render_job(runtime, job.id) == "dead"

    row = reload(db_session, job)  # type: ignore[arg-type]
    assert row.status == JobStatus.DEAD
    assert row.attempts == 2
    assert row.error == "StorageError: S3 is down"
    assert row.finished_at is not None
    assert images_of(db_session, job.id) == []
    # A redelivered message changes nothing.
    assert render_job(runtime, job.id) == "skipped"
    assert reload(db_session, job).attempts == 2  # type: ignore[arg-type]


class UnreachableStorage(FlakyStorage):
    """An S3 endpoint that does not answer, as boto3 reports it: not the job's fault."""

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise EndpointConnectionError(endpoint_url="http://s3.test:9000/bucket/" + key)
        self.inner.put(key, data, content_type=content_type)


def test_an_outage_is_retried_after_a_backoff_without_spending_an_attempt(
    runtime_factory: Callable[..., WorkerRuntime],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    storage = UnreachableStorage(LocalStorage(tmp_path / "down"), failures=100)
    # One attempt allowed: had the outages been counted, the first would make the job dead.
    runtime = runtime_factory(
        storage=storage, max_attempts=1, retry_backoff_seconds=8, retry_backoff_max_seconds=60
    )
    job = make_render_job(db_session, model=str(tiny_model_dir), seeds=[1])

    for attempt in (1, 2, 3):
        before = utcnow()
        assert render_job(runtime, job.id) == "retry"
        after = utcnow()
        row = reload(db_session, job)  # type: ignore[arg-type]
        assert (row.status, row.attempts, row.outages) == (JobStatus.PENDING, attempt, attempt)
        assert row.error is not None and row.error.startswith("EndpointConnectionError: ")
        # The pause doubles with each try (8, 16, 32 s at most), drawn from its upper half.
        # The pause starts when the job is given back, somewhere between `before` and
        # `after`: so retry_at is at least half the ceiling after `before` and at most the
        # ceiling after `after`, however long render_job took on a loaded machine.
        ceiling = 8 * 2 ** (attempt - 1)
        assert row.retry_at is not None
        assert (row.retry_at - before).total_seconds() >= ceiling / 2 - 0.01
        assert (row.retry_at - after).total_seconds() <= ceiling + 0.01
        _requeue(db_session, job.id)

    storage.failures = 0  # storage is back
    assert render_job(runtime, job.id) == "done"
    row = reload(db_session, job)  # type: ignore[arg-type]
    assert (row.status, row.attempts, row.outages, row.error) == (JobStatus.DONE, 4, 3, None)


def test_a_job_out_of_attempts_is_buried_on_its_next_delivery(
    runtime_factory: Callable[..., WorkerRuntime],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
) -> None:
    runtime = runtime_factory(max_attempts=2)
    job = make_render_job(db_session, model=str(tiny_model_dir), seeds=[1])
    db_session.execute(
        update(Job).where(Job.id == job.id).values(attempts=2, error="OutOfMemoryError: CUDA")
    )
    db_session.commit()

    assert render_job(runtime, job.id) == "dead"

    row = reload(db_session, job)  # type: ignore[arg-type]
    assert (row.status, row.attempts, row.error) == (
        JobStatus.DEAD,
        2,
        "OutOfMemoryError: CUDA",
    )
    assert images_of(db_session, job.id) == []


def test_cuda_oom_is_transient(
    runtime_factory: Callable[..., WorkerRuntime],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.pipeline

    def oom(*_: object, **__: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker.pipeline, "render_batch", oom)
    runtime = runtime_factory()
    job = make_render_job(db_session, model=str(tiny_model_dir), seeds=[1])

    assert render_job(runtime, job.id) == "retry"
    row = reload(db_session, job)  # type: ignore[arg-type]
    assert row.status == JobStatus.PENDING
    assert row.error is not None and row.error.startswith("OutOfMemoryError: CUDA out of memory")


@pytest.mark.parametrize("kind", ["bad-scheduler", "missing-model"])
def test_input_errors_fail_at_once_without_retry(
    runtime_factory: Callable[..., WorkerRuntime],
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    kind: str,
) -> None:
    runtime = runtime_factory(max_attempts=3)
    model = str(tiny_model_dir) if kind == "bad-scheduler" else str(tmp_path / "nope")
    scheduler = "warp_drive" if kind == "bad-scheduler" else None
    job = make_render_job(db_session, model=model, seeds=[1], scheduler=scheduler)

    assert render_job(runtime, job.id) == "failed"

    row = reload(db_session, job)  # type: ignore[arg-type]
    assert row.status == JobStatus.FAILED
    assert row.attempts == 1
    expected = "ValueError: " if kind == "bad-scheduler" else "FileNotFoundError: "
    assert row.error is not None and row.error.startswith(expected)


# --- the heartbeat ------------------------------------------------------------------------


@pytest.fixture
def committed_sessions(fresh_database_url: str) -> Iterator[sessionmaker[Session]]:
    """Real commits on a database of its own: the heartbeat runs in another thread."""
    engine = create_engine(fresh_database_url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def test_heartbeat_extends_the_lease_until_stopped(
    committed_sessions: sessionmaker[Session],
) -> None:
    lease = timedelta(seconds=30)
    with committed_sessions() as session:
        job = make_job(session)
        claimed = claim_job(session, job.id, worker="w", lease=lease)
        assert claimed is not None
        first_lease = reload(session, job).lease_expires_at
    assert first_lease is not None

    with Heartbeat(committed_sessions, claimed, lease, interval=0.1) as heartbeat:
        deadline = time.monotonic() + 10
        while heartbeat.beats < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert heartbeat.beats >= 3
    assert not heartbeat.lost.is_set()
    with committed_sessions() as session:
        extended = reload(session, job).lease_expires_at
    assert extended is not None and extended > first_lease

    beats = heartbeat.beats
    time.sleep(0.4)
    assert heartbeat.beats == beats  # stopped


def test_a_failed_heartbeat_is_retried_sooner_than_the_next_beat(
    committed_sessions: sessionmaker[Session],
) -> None:
    """The database answers the first beat with a dropped connection: the next try comes
    within a second or so, not a whole interval later (a short outage must not cost the
    lease)."""
    lease = timedelta(seconds=30)
    with committed_sessions() as session:
        job = make_job(session)
        claimed = claim_job(session, job.id, worker="w", lease=lease)
        assert claimed is not None
    calls: list[float] = []

    def flaky_sessions() -> Session:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
        return committed_sessions()

    started = time.monotonic()
    with Heartbeat(flaky_sessions, claimed, lease, interval=4) as heartbeat:  # type: ignore[arg-type]
        deadline = started + 15
        while heartbeat.beats < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert heartbeat.beats >= 1
    assert len(calls) >= 2
    assert calls[1] - calls[0] <= 2.5  # not another 4 s (at most 1 s, on a busy machine more)


def test_heartbeat_stops_when_the_job_is_taken_over(
    committed_sessions: sessionmaker[Session],
) -> None:
    lease = timedelta(seconds=30)
    with committed_sessions() as session:
        job = make_job(session)
        old = claim_job(session, job.id, worker="a", lease=lease)
        assert old is not None
        expire_lease(session, job.id)
        new = claim_job(session, job.id, worker="b", lease=lease)
        assert new is not None
        new_lease = reload(session, job).lease_expires_at

    heartbeat = Heartbeat(committed_sessions, old, lease, interval=0.05)
    heartbeat.start()
    assert heartbeat.lost.wait(10)
    heartbeat.stop()
    assert heartbeat.beats == 0
    with committed_sessions() as session:
        row = reload(session, job)
        assert (row.worker, row.attempts, row.lease_expires_at) == ("b", 2, new_lease)


def test_render_stops_at_the_next_seed_once_the_heartbeat_lost_the_lease(
    committed_sessions: sessionmaker[Session],
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    pipelines: PipelineCache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job renders longer than its lease thanks to the heartbeat; when another worker takes
    it over anyway, the render stops before its next batch and records nothing more."""
    import worker.image_writer as image_writer_module
    import worker.render as render_module

    # One seed per batch, so "the next batch" is the next seed.
    settings = make_settings(
        tiny_model_dir, tmp_path, job_lease_seconds=10, render_batch_size=1, upload_workers=1
    )
    runtime = WorkerRuntime(
        settings=settings,
        sessions=committed_sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        pipelines=pipelines,
        name="slow-worker",
    )
    with committed_sessions() as session:
        job = make_render_job(session, model=str(tiny_model_dir), seeds=[1, 2, 3, 4])

    taken_over = {"done": False}
    real_extend = image_writer_module.hold_lease

    class FastHeartbeat(Heartbeat):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, interval=0.05)  # type: ignore[arg-type]

    def extend_after_takeover(session: Session, claimed: object, lease: timedelta) -> bool:
        # After the first seed: another worker takes the job over; the per-seed extend_lease
        # is made to succeed, so only the heartbeat can notice.
        if not taken_over["done"]:
            taken_over["done"] = True
            # The heartbeat may extend the lease between our two statements: retry until
            # the takeover wins the race (it must, well within the loop).
            claimed = None
            for _ in range(200):
                with committed_sessions() as other:
                    expire_lease(other, job.id)
                    claimed = claim_job(other, job.id, worker="b", lease=LEASE)
                if claimed is not None:
                    break
            assert claimed is not None
            deadline = time.monotonic() + 10
            while not heartbeat_lost() and time.monotonic() < deadline:
                time.sleep(0.02)
            return True
        return real_extend(session, claimed, lease)  # type: ignore[arg-type]

    heartbeats: list[Heartbeat] = []

    def heartbeat_lost() -> bool:
        return bool(heartbeats) and heartbeats[0].lost.is_set()

    def make_heartbeat(*args: object, **kwargs: object) -> Heartbeat:
        beat = FastHeartbeat(*args, **kwargs)
        heartbeats.append(beat)
        return beat

    monkeypatch.setattr(render_module, "Heartbeat", make_heartbeat)
    # Each batch's rows are recorded under the lease by worker.image_writer.record_batch.
    monkeypatch.setattr(image_writer_module, "hold_lease", extend_after_takeover)

    assert render_job(runtime, job.id) == "skipped"

    with committed_sessions() as session:
        assert [image.seed for image in images_of(session, job.id)] == [1]
        row = reload(session, job)  # type: ignore[arg-type]
        assert (row.status, row.worker, row.attempts) == (JobStatus.RUNNING, "b", 2)


def test_lease_extension_is_fenced(db_session: Session) -> None:
    job = make_job(db_session)
    claimed = claim_job(db_session, job.id, worker="w", lease=LEASE)
    assert claimed is not None
    assert extend_lease(db_session, claimed, LEASE)
    stale = dataclasses.replace(claimed, attempt=claimed.attempt + 1)
    assert not extend_lease(db_session, stale, LEASE)
    assert reload(db_session, job).lease_expires_at > utcnow()  # type: ignore[operator]


# --- the task: a message whose job the database could not even take --------------------------


def test_a_message_met_by_a_database_outage_goes_back_to_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claim itself fails (the database is away): the message is not acknowledged and
    lost (its job would stay queued with no message) but rejected back to the broker after
    a pause that grows while the outage lasts; a job's own error still fails the task."""
    from celery.exceptions import Reject

    import worker.tasks as tasks

    pauses: list[float] = []
    monkeypatch.setattr(tasks.time, "sleep", pauses.append)
    monkeypatch.setattr(tasks, "get_runtime", lambda: None)
    monkeypatch.setattr(tasks, "_outages", type(tasks._outages)(tasks._outages.backoff))

    def unreachable(runtime: object, job_id: int, **_: object) -> str:
        raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))

    monkeypatch.setattr(tasks, "render_job", unreachable)
    for _ in range(3):
        with pytest.raises(Reject) as rejected:
            tasks.render_job_task.run(7)
        assert rejected.value.requeue is True
    assert len(pauses) == 3 and pauses[0] <= 1 and pauses[2] > pauses[0]

    def bug(runtime: object, job_id: int, **_: object) -> str:
        raise KeyError("a bug")

    monkeypatch.setattr(tasks, "render_job", bug)
    with pytest.raises(KeyError):
        tasks.render_job_task.run(7)
