"""Operating on runs (list, pause, resume, cancel) and how the dispatcher honours them: the
window of queued jobs and run priority."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, select, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, Run, RunStatus
from producer.dispatch import dispatch
from producer.runs import RunStateError, cancel_run, list_runs, pause_run, resume_run
from tests.factories import image_row, make_jobs, make_run
from tests.producer.recorder import Recorder
from tests.races import race
from worker.claim import claim_job, finish_job

HOUR = timedelta(hours=1)


def add_image(session: Session, job_id: int, seed: int) -> None:
    key = f"images/{job_id}/{seed}.png"
    session.add(
        image_row(job_id, seed, storage_key=key, sha256="0" * 64, bytes=100, safety="unchecked")
    )
    session.commit()


def set_status(session: Session, ids: Iterable[int], status: str) -> None:
    session.execute(update(Job).where(Job.id.in_(list(ids))).values(status=status))
    session.commit()


def statuses(session: Session, ids: Iterable[int]) -> dict[int, str]:
    session.expire_all()
    return dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(list(ids)))).all())


def run_dispatch(session: Session, *, window: int | None = None) -> Recorder:
    recorder = Recorder()
    dispatch(session, recorder, requeue_after=HOUR, window=window)
    return recorder


# --------------------------------------------------------------------------- list


def test_list_runs_counts_jobs_and_images(db_session: Session) -> None:
    busy = make_run(db_session, name="busy", priority=2)
    done = make_jobs(db_session, busy, 2, status=JobStatus.DONE, seeds_per_job=2)
    make_jobs(db_session, busy, 1, status=JobStatus.FAILED, seeds_per_job=2)
    make_jobs(db_session, busy, 1, status=JobStatus.RUNNING, seeds_per_job=2)
    make_jobs(db_session, busy, 3, status=JobStatus.PENDING, seeds_per_job=2)
    add_image(db_session, done[0], 1)
    add_image(db_session, done[0], 2)
    add_image(db_session, done[1], 1)
    empty = make_run(db_session, RunStatus.PAUSED, name="empty")

    summaries = {summary.name: summary for summary in list_runs(db_session)}

    assert set(summaries) == {"busy", "empty"}
    b = summaries["busy"]
    assert (b.id, b.status, b.priority) == (busy.id, "active", 2)
    assert (b.jobs, b.jobs_done, b.jobs_failed, b.images) == (7, 2, 1, 3)
    e = summaries["empty"]
    assert (e.id, e.status) == (empty.id, "paused")
    assert (e.jobs, e.jobs_done, e.jobs_failed, e.images) == (0, 0, 0, 0)
    # Newest first, limited.
    assert [s.name for s in list_runs(db_session)] == ["empty", "busy"]
    assert [s.name for s in list_runs(db_session, limit=1)] == ["empty"]


# --------------------------------------------------------------------------- pause, resume


def test_pause_unqueues_and_dispatch_skips_the_run_until_resumed(db_session: Session) -> None:
    paused = make_run(db_session)
    other = make_run(db_session)
    paused_ids = make_jobs(db_session, paused, 4, seeds_per_job=2)
    # Two of the paused run's jobs are already on the broker.
    first = run_dispatch(db_session, window=2)
    assert sorted(first.ids) == sorted(paused_ids[:2])
    other_ids = make_jobs(db_session, other, 3, seeds_per_job=2)

    requeued = pause_run(db_session, paused)

    assert requeued == 2
    assert db_session.scalar(select(Run.status).where(Run.id == paused.id)) == "paused"
    assert set(statuses(db_session, paused_ids).values()) == {JobStatus.PENDING}
    queued_at = db_session.scalars(select(Job.queued_at).where(Job.id.in_(paused_ids))).all()
    assert queued_at == [None] * 4

    while_paused = run_dispatch(db_session)
    assert sorted(while_paused.ids) == sorted(other_ids)
    assert set(statuses(db_session, paused_ids).values()) == {JobStatus.PENDING}

    resume_run(db_session, paused)

    assert db_session.scalar(select(Run.status).where(Run.id == paused.id)) == "active"
    after_resume = run_dispatch(db_session)
    assert sorted(after_resume.ids) == sorted(paused_ids)
    assert set(statuses(db_session, paused_ids).values()) == {JobStatus.QUEUED}


def test_resuming_a_run_whose_jobs_ended_while_paused_finishes_it(db_session: Session) -> None:
    run = make_run(db_session)
    (job_id,) = make_jobs(db_session, run, 1)
    claim = claim_job(db_session, job_id, worker="w", lease=HOUR)
    assert claim is not None
    pause_run(db_session, run)
    assert finish_job(db_session, claim)  # the run's last job ends while it is paused
    assert db_session.scalar(select(Run.status).where(Run.id == run.id)) == "paused"

    resume_run(db_session, run)

    row = db_session.execute(select(Run.status, Run.finished_at).where(Run.id == run.id)).one()
    assert row.status == "finished" and row.finished_at is not None
    assert run.status == RunStatus.FINISHED  # the caller's object says so too


def test_resuming_a_run_with_jobs_left_keeps_it_active(db_session: Session) -> None:
    run = make_run(db_session, RunStatus.PAUSED)
    make_jobs(db_session, run, 1, status=JobStatus.DONE)
    make_jobs(db_session, run, 1, status=JobStatus.RUNNING)

    resume_run(db_session, run)

    row = db_session.execute(select(Run.status, Run.finished_at).where(Run.id == run.id)).one()
    assert (row.status, row.finished_at) == ("active", None)


@pytest.fixture
def committed_engine(fresh_database_url: str) -> Iterator[Engine]:
    engine = create_engine(fresh_database_url, pool_size=4)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("first", ["finish", "resume"])
def test_resume_racing_the_last_job_to_end_finishes_the_run(
    committed_engine: Engine, first: str
) -> None:
    """The paused run's last job ends while the run is resumed: whichever commits first, the
    run ends up finished, not active with nothing left to end it."""
    with Session(committed_engine, expire_on_commit=False) as session:
        run = make_run(session)
        (job_id,) = make_jobs(session, run, 1)
        claim = claim_job(session, job_id, worker="w", lease=HOUR)
        assert claim is not None
        pause_run(session, run)
        run_id = run.id

    def finish(session: Session) -> bool:
        return finish_job(session, claim)

    def resume(session: Session) -> None:
        run = session.get(Run, run_id)
        assert run is not None
        resume_run(session, run)

    if first == "finish":
        second_waited = race(
            committed_engine, finish, resume, hold_after="UPDATE jobs"
        ).second_waited
    else:
        second_waited = race(
            committed_engine, resume, finish, hold_after="UPDATE runs"
        ).second_waited

    with Session(committed_engine) as session:
        row = session.execute(select(Run.status, Run.finished_at).where(Run.id == run_id)).one()
        assert row.status == "finished" and row.finished_at is not None
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.DONE
    assert second_waited  # serialised on the run's row


# --------------------------------------------------------------------------- cancel


def test_cancel_cancels_jobs_not_started_and_cannot_be_resumed(db_session: Session) -> None:
    run = make_run(db_session)
    pending = make_jobs(db_session, run, 3, seeds_per_job=2)
    queued = make_jobs(db_session, run, 2, status=JobStatus.QUEUED, seeds_per_job=2)
    running = make_jobs(db_session, run, 1, status=JobStatus.RUNNING, seeds_per_job=2)
    done = make_jobs(db_session, run, 1, status=JobStatus.DONE, seeds_per_job=2)
    bystander = make_run(db_session)
    untouched = make_jobs(db_session, bystander, 2, seeds_per_job=2)

    cancelled = cancel_run(db_session, run)

    assert cancelled == 5
    row = db_session.execute(select(Run.status, Run.finished_at).where(Run.id == run.id)).one()
    assert row.status == "cancelled" and row.finished_at is not None
    after = statuses(db_session, pending + queued + running + done + untouched)
    assert {after[i] for i in pending + queued} == {JobStatus.CANCELLED}
    assert after[running[0]] == JobStatus.RUNNING
    assert after[done[0]] == JobStatus.DONE
    assert {after[i] for i in untouched} == {JobStatus.PENDING}

    with pytest.raises(RunStateError, match="resume"):
        resume_run(db_session, run)
    with pytest.raises(RunStateError, match="pause"):
        pause_run(db_session, run)
    assert db_session.scalar(select(Run.status).where(Run.id == run.id)) == "cancelled"
    assert run_dispatch(db_session).ids == sorted(untouched)


# --------------------------------------------------------------------------- window


def test_dispatch_window_keeps_at_most_window_jobs_queued(db_session: Session) -> None:
    run = make_run(db_session)
    ids = make_jobs(db_session, run, 10, seeds_per_job=2)

    first = run_dispatch(db_session, window=3)

    assert first.ids == ids[:3]
    after = statuses(db_session, ids)
    assert [i for i in ids if after[i] == JobStatus.QUEUED] == ids[:3]

    # Nothing moved on: a second dispatch publishes nothing.
    assert run_dispatch(db_session, window=3).ids == []

    # A worker claims one and finishes another.
    set_status(db_session, [ids[0]], JobStatus.RUNNING)
    set_status(db_session, [ids[1]], JobStatus.DONE)

    topped_up = run_dispatch(db_session, window=3)

    assert topped_up.ids == ids[3:5]
    after = statuses(db_session, ids)
    assert [i for i in ids if after[i] == JobStatus.QUEUED] == [ids[2], ids[3], ids[4]]
    assert [i for i in ids if after[i] == JobStatus.PENDING] == ids[5:]


# --------------------------------------------------------------------------- priority


def test_higher_priority_run_is_published_first(db_session: Session) -> None:
    early = make_run(db_session, priority=0)
    early_ids = make_jobs(db_session, early, 3, seeds_per_job=2)
    urgent = make_run(db_session, priority=5)
    urgent_ids = make_jobs(db_session, urgent, 3, seeds_per_job=2)

    windowed = run_dispatch(db_session, window=3)
    assert windowed.ids == urgent_ids

    set_status(db_session, urgent_ids, JobStatus.DONE)
    rest = run_dispatch(db_session, window=3)
    assert rest.ids == early_ids


def test_priority_orders_one_batch(db_session: Session) -> None:
    early = make_run(db_session, priority=0)
    early_ids = make_jobs(db_session, early, 2, seeds_per_job=2)
    urgent = make_run(db_session, priority=5)
    urgent_ids = make_jobs(db_session, urgent, 2, seeds_per_job=2)

    recorder = run_dispatch(db_session)

    assert recorder.ids == urgent_ids + early_ids
