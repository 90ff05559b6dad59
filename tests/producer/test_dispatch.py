"""dispatch(): pending -> queued in a committed transaction, then publish; re-publish stale
queued jobs; several dispatchers split the work with FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job, JobStatus, Run, RunStatus, utcnow
from pixelmill.outages import ServiceUnavailableError
from producer.dispatch import (
    DispatchReport,
    PublishError,
    celery_broker_count,
    celery_publisher,
    dispatch,
)
from producer.produce import produce
from producer.runs import pause_run
from tests.factories import make_jobs, make_run
from tests.producer.recorder import Recorder
from tests.races import race

HOUR = timedelta(hours=1)


def statuses(session: Session, ids: Iterable[int]) -> dict[int, str]:
    return dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(list(ids)))).all())


def queued_ats(session: Session, ids: Iterable[int]) -> dict[int, datetime | None]:
    return dict(session.execute(select(Job.id, Job.queued_at).where(Job.id.in_(list(ids)))).all())


# --------------------------------------------------------------------------- basics


def test_pending_jobs_are_queued_then_published(db_session: Session) -> None:
    run = make_run(db_session)
    ids = make_jobs(db_session, run, 7)
    seen_in_callback: list[dict[int, str]] = []

    def publish(batch: Iterable[int]) -> None:
        batch = list(batch)
        # The state change is already visible (and committed: the session is not inside
        # the dispatcher's transaction any more) when the ids reach the broker.
        seen_in_callback.append(statuses(db_session, batch))
        recorder(batch)

    recorder = Recorder()
    before = utcnow()
    report = dispatch(db_session, publish, requeue_after=HOUR, batch_size=3)

    assert report.published == 7
    assert report.republished == 0
    assert sorted(recorder.ids) == sorted(ids)
    assert len(recorder.ids) == len(set(recorder.ids))
    assert [len(batch) for batch in recorder.calls] == [3, 3, 1]
    assert seen_in_callback == [
        {job_id: JobStatus.QUEUED for job_id in batch} for batch in recorder.calls
    ]
    assert set(statuses(db_session, ids).values()) == {JobStatus.QUEUED}
    for queued_at in queued_ats(db_session, ids).values():
        assert queued_at is not None and before <= queued_at <= utcnow()


def test_nothing_pending_publishes_nothing(db_session: Session) -> None:
    run = make_run(db_session)
    make_jobs(db_session, run, 2, status=JobStatus.DONE, queued_at=utcnow() - 2 * HOUR)
    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=HOUR)
    assert (report.published, report.republished) == (0, 0)
    assert recorder.calls == []


def test_paused_and_cancelled_runs_are_not_dispatched(db_session: Session) -> None:
    active = make_jobs(db_session, make_run(db_session, RunStatus.ACTIVE), 2)
    held = {
        status: make_jobs(db_session, make_run(db_session, status), 2)
        for status in (RunStatus.PAUSED, RunStatus.CANCELLED, RunStatus.FINISHED)
    }
    stale_paused = make_jobs(
        db_session,
        make_run(db_session, RunStatus.PAUSED),
        2,
        status=JobStatus.QUEUED,
        queued_at=utcnow() - 2 * HOUR,
    )
    recorder = Recorder()

    report = dispatch(db_session, recorder, requeue_after=HOUR)

    assert sorted(recorder.ids) == sorted(active)
    assert (report.published, report.republished) == (2, 0)
    for ids in held.values():
        assert set(statuses(db_session, ids).values()) == {JobStatus.PENDING}
        assert set(queued_ats(db_session, ids).values()) == {None}
    # A paused run's stale queued jobs are not re-published either.
    assert not set(recorder.ids) & set(stale_paused)
    assert set(statuses(db_session, stale_paused).values()) == {JobStatus.QUEUED}


def test_resumed_run_is_dispatched(db_session: Session) -> None:
    run = make_run(db_session, RunStatus.PAUSED)
    ids = make_jobs(db_session, run, 3)
    assert dispatch(db_session, Recorder(), requeue_after=HOUR).published == 0

    db_session.execute(update(Run).where(Run.id == run.id).values(status=RunStatus.ACTIVE))
    db_session.commit()
    recorder = Recorder()
    assert dispatch(db_session, recorder, requeue_after=HOUR).published == 3
    assert sorted(recorder.ids) == sorted(ids)


def test_run_id_filter(db_session: Session) -> None:
    run_a, run_b = make_run(db_session), make_run(db_session)
    ids_a = make_jobs(db_session, run_a, 3)
    ids_b = make_jobs(db_session, run_b, 4)

    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=HOUR, run_id=run_a.id)
    assert report.published == 3
    assert sorted(recorder.ids) == sorted(ids_a)
    assert set(statuses(db_session, ids_b).values()) == {JobStatus.PENDING}

    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=HOUR)
    assert report.published == 4
    assert sorted(recorder.ids) == sorted(ids_b)


# --------------------------------------------------------------------------- re-publishing


def test_stale_queued_jobs_are_republished(db_session: Session) -> None:
    run = make_run(db_session)
    long_ago = utcnow() - 2 * HOUR
    stale = make_jobs(db_session, run, 3, status=JobStatus.QUEUED, queued_at=long_ago)
    fresh_time = utcnow() - timedelta(minutes=10)
    fresh = make_jobs(db_session, run, 2, status=JobStatus.QUEUED, queued_at=fresh_time)
    others = {
        status: make_jobs(db_session, run, 2, status=status, queued_at=long_ago)
        for status in (JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED, JobStatus.BLOCKED)
    }
    recorder = Recorder()
    before = utcnow()

    report = dispatch(db_session, recorder, requeue_after=HOUR, batch_size=2)

    assert report.published == 0
    assert report.republished == 3
    assert sorted(recorder.ids) == sorted(stale)
    assert len(recorder.ids) == len(set(recorder.ids))
    for queued_at in queued_ats(db_session, stale).values():
        assert queued_at is not None and before <= queued_at <= utcnow()
    assert set(statuses(db_session, stale).values()) == {JobStatus.QUEUED}
    assert set(queued_ats(db_session, fresh).values()) == {fresh_time}
    for status, ids in others.items():
        assert set(statuses(db_session, ids).values()) == {status}
        assert set(queued_ats(db_session, ids).values()) == {long_ago}

    # Just re-published: not stale any more.
    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=HOUR)
    assert (report.published, report.republished) == (0, 0)
    assert recorder.calls == []


class BrokenBroker:
    """A publisher whose broker goes away after ``sends`` messages, as kombu's would: the
    batch fails part-way (a PublishError naming what was sent) or at once (a bare error)."""

    def __init__(self, sends: int | None = None) -> None:
        self.sends = sends
        self.sent: list[int] = []

    def __call__(self, batch: Iterable[int]) -> None:
        if self.sends is None:
            raise ConnectionError("broker down")
        sent = []
        for job_id in batch:
            if len(self.sent) >= self.sends:
                raise PublishError(ConnectionRefusedError("broker down"), sent)
            sent.append(job_id)
            self.sent.append(job_id)


@pytest.mark.parametrize("sends", [None, 0])
def test_failed_publish_returns_the_jobs_to_pending_at_once(
    db_session: Session, sends: int | None
) -> None:
    run = make_run(db_session)
    ids = make_jobs(db_session, run, 4)

    with pytest.raises((ConnectionError, PublishError)):
        dispatch(db_session, BrokenBroker(sends), requeue_after=HOUR, window=4)
    db_session.rollback()  # whatever the caller does after the error, the state stays

    # Not left queued without a message (filling the window until requeue_after) ...
    assert set(statuses(db_session, ids).values()) == {JobStatus.PENDING}
    assert set(queued_ats(db_session, ids).values()) == {None}
    # ... but published at the next round, each once.
    recorder = Recorder(max_calls=5)
    report = dispatch(db_session, recorder, requeue_after=HOUR, window=4)
    assert (report.published, report.republished) == (4, 0)
    assert sorted(recorder.ids) == sorted(ids)


def test_a_publish_failing_part_way_keeps_what_was_sent_queued(db_session: Session) -> None:
    run = make_run(db_session)
    ids = make_jobs(db_session, run, 5)
    broker = BrokenBroker(sends=2)

    with pytest.raises(PublishError) as raised:
        dispatch(db_session, broker, requeue_after=HOUR)

    assert raised.value.service == "broker"
    sent = set(broker.sent)
    assert len(sent) == 2
    now = statuses(db_session, ids)
    assert {job_id for job_id, status in now.items() if status == JobStatus.QUEUED} == sent
    assert {job_id for job_id, status in now.items() if status == JobStatus.PENDING} == (
        set(ids) - sent
    )


def test_a_failed_republish_returns_the_jobs_to_pending(db_session: Session) -> None:
    run = make_run(db_session)
    stale = make_jobs(db_session, run, 3, status=JobStatus.QUEUED, queued_at=utcnow() - HOUR)

    with pytest.raises(ConnectionError):
        dispatch(db_session, BrokenBroker(), requeue_after=timedelta(minutes=5))

    assert set(statuses(db_session, stale).values()) == {JobStatus.PENDING}


def test_stale_jobs_the_broker_still_holds_are_not_republished(db_session: Session) -> None:
    """Jobs that only wait their turn on the broker (behind long jobs) keep their message;
    only as many as the broker is missing are published again, the longest-queued first."""
    run = make_run(db_session)
    stale = [
        make_jobs(db_session, run, 1, status=JobStatus.QUEUED, queued_at=utcnow() - age)[0]
        for age in (5 * HOUR, 4 * HOUR, 3 * HOUR, 2 * HOUR)
    ]
    fresh = make_jobs(db_session, run, 2, status=JobStatus.QUEUED, queued_at=utcnow())

    # The broker holds a message for every queued job: nothing was lost.
    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=HOUR, broker_count=lambda: 6)
    assert (report.republished, report.still_held, recorder.ids) == (0, 4, [])

    # It holds only four: two were lost, the two queued longest are published again.
    report = dispatch(db_session, recorder, requeue_after=HOUR, broker_count=lambda: 4)
    assert (report.republished, report.still_held) == (2, 2)
    assert recorder.ids == stale[:2]

    # Empty (a broker restarted without its messages): every stale job, never the fresh ones.
    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=HOUR, broker_count=lambda: 0)
    assert sorted(recorder.ids) == sorted(stale[2:])
    assert not set(recorder.ids) & set(fresh)

    # More messages than queued jobs (duplicates, a paused run's): nothing to re-publish.
    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=timedelta(0), broker_count=lambda: 50)
    assert (report.republished, recorder.ids) == (0, [])


def test_a_busy_worker_may_hold_one_message_per_running_job(db_session: Session) -> None:
    """A worker rendering a job has taken the next message already (prefetch) and holds it
    until that job is done: that message is neither on the broker nor lost."""
    run = make_run(db_session)
    stale = make_jobs(db_session, run, 3, status=JobStatus.QUEUED, queued_at=utcnow() - HOUR)
    make_jobs(db_session, run, 2, status=JobStatus.RUNNING)

    recorder = Recorder()
    report = dispatch(
        db_session, recorder, requeue_after=timedelta(minutes=5), broker_count=lambda: 0
    )

    # Three queued, none on the broker, two workers busy: at most one message lost.
    assert (report.republished, recorder.ids) == (1, stale[:1])


def test_a_job_in_its_retry_backoff_is_published_when_the_pause_is_over(
    db_session: Session,
) -> None:
    run = make_run(db_session)
    waiting, due, plain = make_jobs(db_session, run, 3)
    db_session.execute(
        update(Job).where(Job.id == waiting).values(retry_at=utcnow() + timedelta(minutes=5))
    )
    db_session.execute(
        update(Job).where(Job.id == due).values(retry_at=utcnow() - timedelta(seconds=1))
    )
    db_session.commit()

    recorder = Recorder()
    report = dispatch(db_session, recorder, requeue_after=HOUR)

    assert report.published == 2
    assert sorted(recorder.ids) == sorted([due, plain])
    assert statuses(db_session, [waiting]) == {waiting: JobStatus.PENDING}
    retry_ats = dict(db_session.execute(select(Job.id, Job.retry_at)).all())
    assert retry_ats[due] is None  # queued: its pause is over


def test_zero_requeue_after_publishes_each_job_once_per_call(db_session: Session) -> None:
    """Jobs queued (or re-published) by this very call are not stale within it."""
    run = make_run(db_session)
    ids = make_jobs(db_session, run, 3)
    recorder = Recorder(max_calls=5)

    report = dispatch(db_session, recorder, requeue_after=timedelta(0))

    assert report.published == 3
    assert report.republished == 0, recorder.calls
    assert sorted(recorder.ids) == sorted(ids)


# --------------------------------------------------------------------------- real database


@pytest.fixture
def committed_engine(fresh_database_url: str) -> Iterator[Engine]:
    engine = create_engine(fresh_database_url, pool_size=5)
    yield engine
    engine.dispose()


def produce_committed(engine: Engine, tmp_path: Path, items: int) -> list[int]:
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text(
        "sku,title\n" + "".join(f"S{i:05d},thing {i}\n" for i in range(items)), "utf-8"
    )
    templates = tmp_path / "templates.yaml"
    templates.write_text(
        "key: sku\ndefaults: {width: 64, height: 64, steps: 2, seeds: 1}\n"
        "templates:\n  a:\n    prompt: 'a {{ title }}'\n  b:\n    prompt: 'b {{ title }}'\n",
        "utf-8",
    )
    with Session(engine) as session:
        report = produce(
            session,
            catalogue_path=catalogue,
            templates_path=templates,
            seeds=None,
            default_model="m",
            run_name="concurrency",
        )
    assert report.jobs_new == 2 * items
    with Session(engine) as session:
        return list(session.scalars(select(Job.id).where(Job.run_id == report.run_id)))


def test_publish_sees_committed_state_from_another_connection(
    committed_engine: Engine, tmp_path: Path
) -> None:
    ids = produce_committed(committed_engine, tmp_path, 5)
    seen: list[dict[int, str]] = []

    with committed_engine.connect() as observer, Session(committed_engine) as session:

        def publish(batch: Iterable[int]) -> None:
            batch = list(batch)
            # Another connection (a worker) must already see the jobs as queued.
            rows = observer.execute(select(Job.id, Job.status).where(Job.id.in_(batch))).all()
            observer.rollback()
            seen.append(dict(rows))

        report = dispatch(session, publish, requeue_after=HOUR, batch_size=4)

    assert report.published == 10
    assert [len(batch) for batch in seen] == [4, 4, 2]
    assert sorted(job_id for batch in seen for job_id in batch) == sorted(ids)
    assert all(status == JobStatus.QUEUED for batch in seen for status in batch.values())


def test_locked_jobs_are_skipped_not_waited_for(committed_engine: Engine, tmp_path: Path) -> None:
    """A dispatcher skips the rows another one holds (SKIP LOCKED) instead of blocking."""
    ids = sorted(produce_committed(committed_engine, tmp_path, 10))
    held = ids[:5]
    with committed_engine.connect() as other:
        other.execute(select(Job.id).where(Job.id.in_(held)).with_for_update())
        with Session(committed_engine) as session:
            # Blocking on the lock would fail the test instead of hanging it.
            session.execute(text("SET lock_timeout = '5s'"))
            recorder = Recorder()
            report = dispatch(session, recorder, requeue_after=HOUR, batch_size=3)
            assert sorted(recorder.ids) == ids[5:]
            assert report.published == 15
        other.rollback()

    with Session(committed_engine) as session:
        recorder = Recorder()
        report = dispatch(session, recorder, requeue_after=HOUR)
        assert sorted(recorder.ids) == held
        assert report.published == 5


def test_concurrent_dispatchers_split_the_jobs(committed_engine: Engine, tmp_path: Path) -> None:
    ids = produce_committed(committed_engine, tmp_path, 300)  # 600 jobs
    sessions = sessionmaker(committed_engine, expire_on_commit=False)
    barrier = threading.Barrier(2, timeout=30)
    published: list[list[int]] = [[], []]
    reports: list[Any] = [None, None]
    errors: list[BaseException] = []

    def dispatcher(index: int) -> None:
        try:
            with sessions() as session:
                # Open the connection before the barrier so both start at once.
                session.execute(text("SELECT 1"))
                session.commit()

                def publish(batch: Iterable[int]) -> None:
                    published[index].extend(batch)

                barrier.wait()
                reports[index] = dispatch(session, publish, requeue_after=HOUR, batch_size=7)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=dispatcher, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a dispatcher hung"
    if errors:
        raise errors[0]

    first, second = published
    assert len(first) == len(set(first))
    assert len(second) == len(set(second))
    assert not set(first) & set(second), "a job was published by both dispatchers"
    assert sorted(first + second) == sorted(ids)
    assert reports[0].published + reports[1].published == len(ids)
    assert reports[0].published == len(first) and reports[1].published == len(second)
    assert first and second, "one dispatcher did all the work: the test did not overlap them"

    with Session(committed_engine) as session:
        assert set(statuses(session, ids).values()) == {JobStatus.QUEUED}


@pytest.mark.parametrize("first", ["dispatch", "pause"])
def test_pause_racing_the_dispatcher_leaves_no_job_queued(
    committed_engine: Engine, first: str
) -> None:
    """A run paused while the dispatcher queues its jobs: whichever commits first, the paused
    run has no queued job left, and pause counts the jobs it returned to pending."""
    with Session(committed_engine, expire_on_commit=False) as session:
        run = make_run(session)
        ids = make_jobs(session, run, 3)
        run_id = run.id
    recorder = Recorder()

    def dispatch_jobs(session: Session) -> DispatchReport:
        return dispatch(session, recorder, requeue_after=HOUR)

    def pause(session: Session) -> int:
        run = session.get(Run, run_id)
        assert run is not None
        return pause_run(session, run)

    if first == "dispatch":
        dispatched_first = race(committed_engine, dispatch_jobs, pause, hold_after="UPDATE jobs")
        # The dispatcher queued (and published) every job, and pause took them all back.
        assert sorted(recorder.ids) == sorted(ids)
        assert dispatched_first.second == 3
        second_waited = dispatched_first.second_waited
    else:
        paused_first = race(committed_engine, pause, dispatch_jobs, hold_after="UPDATE jobs")
        # The dispatcher waited for the pause and then found no active run.
        assert recorder.ids == []
        assert paused_first.first == 0
        second_waited = paused_first.second_waited

    with Session(committed_engine) as session:
        assert session.scalar(select(Run.status).where(Run.id == run_id)) == RunStatus.PAUSED
        assert set(statuses(session, ids).values()) == {JobStatus.PENDING}
    assert second_waited  # serialised on the run's row


# --------------------------------------------------------------------------- real brokers


def test_the_broker_count_is_what_the_broker_holds(broker_url: str, render_queue: str) -> None:
    from pixelmill.settings import get_settings
    from pixelmill.tasks import publisher_app

    app = publisher_app(get_settings(broker_url=broker_url, render_queue=render_queue))
    try:
        count = celery_broker_count(app, render_queue)
        assert count() == 0  # not even declared yet
        celery_publisher(app, render_queue)([11, 12, 13])
        assert count() == 3
    finally:
        app.close()


def test_an_unreachable_broker_is_an_outage_with_nothing_sent() -> None:
    from pixelmill.settings import get_settings
    from pixelmill.tasks import publisher_app

    for url in ("redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"):
        app = publisher_app(get_settings(broker_url=url))
        try:
            with pytest.raises(PublishError) as raised:
                celery_publisher(app, "render")([1, 2])
            assert (raised.value.service, raised.value.sent) == ("broker", [])
            with pytest.raises(ServiceUnavailableError) as unreachable:
                celery_broker_count(app, "render")()
            assert unreachable.value.service == "broker"
        finally:
            app.close()


def test_the_dispatcher_counts_expired_leases_and_burials(
    committed_engine: Engine,
    fresh_database_url: str,
    broker_url: str,
    render_queue: str,
    tmp_path: Path,
) -> None:
    """`pixelmill dispatch` (one round): a lost worker's job is requeued with a backoff, one
    out of attempts is buried, and both are counted in the dispatcher's metrics."""
    from cli.dispatch import dispatch_once
    from pixelmill.settings import get_settings
    from producer.metrics import EXPIRED_LEASES
    from tests.worker.support import expire_lease
    from worker.claim import claim_job

    with Session(committed_engine, expire_on_commit=False) as session:
        run = make_run(session)
        lost, exhausted = make_jobs(session, run, 2)
        for job_id in (lost, exhausted):
            assert claim_job(session, job_id, worker="w", lease=HOUR) is not None
            expire_lease(session, job_id)
        session.execute(update(Job).where(Job.id == exhausted).values(attempts=3))
        session.commit()

    def counted(outcome: str) -> float:
        return EXPIRED_LEASES.labels(outcome)._value.get()  # type: ignore[attr-defined]

    before = {outcome: counted(outcome) for outcome in ("requeued", "dead")}
    settings = get_settings(
        database_url=fresh_database_url,
        broker_url=broker_url,
        render_queue=render_queue,
        data_dir=tmp_path,
        retry_backoff_seconds=60,
    )
    dispatch_once(settings, quiet=True)

    assert counted("requeued") - before["requeued"] == 1
    assert counted("dead") - before["dead"] == 1
    with Session(committed_engine) as session:
        rows = {job.id: job for job in session.scalars(select(Job))}
    assert rows[exhausted].status == JobStatus.DEAD
    # Requeued, and not published in the same round: it waits out its backoff.
    assert rows[lost].status == JobStatus.PENDING
    assert rows[lost].retry_at is not None and rows[lost].retry_at > utcnow()
