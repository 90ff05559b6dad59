"""claim_job and the fenced writes (extend_lease, finish_job, fail_job) on real Postgres."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, Run, RunStatus, utcnow
from pixelmill.outages import RetryBackoff
from producer.runs import cancel_run
from tests.factories import make_job, make_run
from tests.races import race
from tests.worker.support import expire_lease, reload
from worker.claim import (
    ClaimedJob,
    claim_job,
    extend_lease,
    fail_job,
    finish_job,
    reap_expired,
    release_job,
)

LEASE = timedelta(minutes=30)


@pytest.mark.parametrize("status", [JobStatus.PENDING, JobStatus.QUEUED])
def test_claim_moves_job_to_running(db_session: Session, status: JobStatus) -> None:
    job = make_job(db_session, status=status, seeds=[5, 6])
    before = utcnow()

    claimed = claim_job(db_session, job.id, worker="worker-a", lease=LEASE)

    assert claimed is not None
    assert claimed.id == job.id
    assert claimed.run_id == job.run_id
    assert claimed.attempt == 1
    assert claimed.seeds == [5, 6]
    assert (claimed.prompt, claimed.negative_prompt) == ("a brass lamp on a table", "blurry")
    assert (claimed.model, claimed.scheduler) == ("tiny", None)
    assert (claimed.steps, claimed.guidance, claimed.width, claimed.height) == (2, 7.5, 64, 64)

    row = reload(db_session, job)
    assert row.status == JobStatus.RUNNING
    assert row.attempts == 1
    assert row.worker == "worker-a"
    assert row.started_at is not None and row.started_at >= before
    assert row.lease_expires_at is not None
    assert before + LEASE <= row.lease_expires_at <= utcnow() + LEASE
    assert row.error is None


def test_second_claim_of_running_job_with_live_lease_is_refused(db_session: Session) -> None:
    job = make_job(db_session)
    first = claim_job(db_session, job.id, worker="worker-a", lease=LEASE)
    assert first is not None
    lease_before = reload(db_session, job).lease_expires_at

    assert claim_job(db_session, job.id, worker="worker-b", lease=LEASE) is None

    row = reload(db_session, job)
    assert row.status == JobStatus.RUNNING
    assert row.attempts == 1
    assert row.worker == "worker-a"
    assert row.lease_expires_at == lease_before


@pytest.mark.parametrize("status", [JobStatus.DONE, JobStatus.FAILED, JobStatus.BLOCKED])
def test_finished_jobs_are_not_claimable(db_session: Session, status: JobStatus) -> None:
    job = make_job(db_session, status=status)

    assert claim_job(db_session, job.id, worker="worker-a", lease=LEASE) is None

    row = reload(db_session, job)
    assert row.status == status
    assert row.attempts == 0
    assert row.worker is None
    assert row.lease_expires_at is None


@pytest.mark.parametrize("run_status", [RunStatus.PAUSED, RunStatus.CANCELLED, RunStatus.FINISHED])
def test_jobs_of_an_inactive_run_are_not_claimable(
    db_session: Session, run_status: RunStatus
) -> None:
    run = make_run(db_session, status=run_status)
    job = make_job(db_session, run, status=JobStatus.QUEUED)

    assert claim_job(db_session, job.id, worker="worker-a", lease=LEASE) is None

    row = reload(db_session, job)
    assert row.status == JobStatus.QUEUED
    assert row.attempts == 0


def test_job_of_paused_run_becomes_claimable_when_run_resumes(db_session: Session) -> None:
    run = make_run(db_session, status=RunStatus.PAUSED)
    job = make_job(db_session, run)
    assert claim_job(db_session, job.id, worker="worker-a", lease=LEASE) is None

    run.status = RunStatus.ACTIVE
    db_session.commit()

    claimed = claim_job(db_session, job.id, worker="worker-a", lease=LEASE)
    assert claimed is not None and claimed.attempt == 1


def test_unknown_job_is_not_claimable(db_session: Session) -> None:
    assert claim_job(db_session, 987_654_321, worker="worker-a", lease=LEASE) is None


def test_expired_lease_is_taken_over(db_session: Session) -> None:
    job = make_job(db_session)
    first = claim_job(db_session, job.id, worker="worker-a", lease=LEASE)
    assert first is not None
    expire_lease(db_session, job.id)

    second = claim_job(db_session, job.id, worker="worker-b", lease=LEASE)

    assert second is not None
    assert second.attempt == 2
    row = reload(db_session, job)
    assert row.status == JobStatus.RUNNING
    assert row.attempts == 2
    assert row.worker == "worker-b"
    assert row.lease_expires_at is not None and row.lease_expires_at > utcnow()
    # ... and the new lease is live again: a third worker is refused.
    assert claim_job(db_session, job.id, worker="worker-c", lease=LEASE) is None


def _taken_over(db_session: Session) -> tuple[Job, ClaimedJob, ClaimedJob]:
    job = make_job(db_session)
    old = claim_job(db_session, job.id, worker="worker-a", lease=LEASE)
    assert old is not None
    expire_lease(db_session, job.id)
    new = claim_job(db_session, job.id, worker="worker-b", lease=LEASE)
    assert new is not None
    assert (old.attempt, new.attempt) == (1, 2)
    return job, old, new


def _snapshot(row: Job) -> tuple[object, ...]:
    return (
        row.status,
        row.attempts,
        row.worker,
        row.error,
        row.started_at,
        row.lease_expires_at,
        row.finished_at,
    )


def test_old_claim_cannot_write_after_takeover(db_session: Session) -> None:
    job, old, _new = _taken_over(db_session)
    before = _snapshot(reload(db_session, job))

    assert finish_job(db_session, old) is False
    assert _snapshot(reload(db_session, job)) == before
    assert fail_job(db_session, old, "stale worker failure") is False
    assert _snapshot(reload(db_session, job)) == before
    assert extend_lease(db_session, old, timedelta(hours=5)) is False
    assert _snapshot(reload(db_session, job)) == before

    row = reload(db_session, job)
    assert row.status == JobStatus.RUNNING
    assert row.worker == "worker-b"
    assert row.error is None
    assert row.finished_at is None


def test_new_claim_can_extend_and_finish(db_session: Session) -> None:
    job, old, new = _taken_over(db_session)
    lease_before = reload(db_session, job).lease_expires_at
    assert lease_before is not None

    assert extend_lease(db_session, new, timedelta(hours=5)) is True
    row = reload(db_session, job)
    assert row.lease_expires_at is not None
    assert row.lease_expires_at > lease_before + timedelta(hours=4)

    assert finish_job(db_session, new) is True
    row = reload(db_session, job)
    assert row.status == JobStatus.DONE
    assert row.finished_at is not None
    assert row.lease_expires_at is None
    assert row.attempts == 2

    # Once done, neither claim can write any more, and the job cannot be claimed again.
    assert fail_job(db_session, new, "late") is False
    assert fail_job(db_session, old, "late") is False
    assert extend_lease(db_session, new, LEASE) is False
    assert claim_job(db_session, job.id, worker="worker-c", lease=LEASE) is None
    row = reload(db_session, job)
    assert row.status == JobStatus.DONE
    assert row.error is None


def test_new_claim_can_fail(db_session: Session) -> None:
    job, old, new = _taken_over(db_session)

    assert fail_job(db_session, new, "boom: " + "x" * 5000) is True

    row = reload(db_session, job)
    assert row.status == JobStatus.FAILED
    assert row.error is not None and row.error.startswith("boom: ")
    assert len(row.error) == 4000  # truncated
    assert row.finished_at is not None
    assert row.lease_expires_at is None
    assert finish_job(db_session, old) is False
    assert finish_job(db_session, new) is False
    assert reload(db_session, job).status == JobStatus.FAILED


def test_the_last_job_to_end_finishes_its_run(db_session: Session) -> None:
    run = make_run(db_session)
    first, second = make_job(db_session, run), make_job(db_session, run)
    claim_a = claim_job(db_session, first.id, worker="a", lease=LEASE)
    claim_b = claim_job(db_session, second.id, worker="b", lease=LEASE)
    assert claim_a is not None and claim_b is not None

    assert finish_job(db_session, claim_a)
    db_session.refresh(run)
    assert (run.status, run.finished_at) == (RunStatus.ACTIVE, None)  # one job still running

    assert fail_job(db_session, claim_b, "boom")  # a failed job ends too
    db_session.refresh(run)
    assert run.status == RunStatus.FINISHED
    assert run.finished_at is not None


def test_a_paused_run_is_not_marked_finished(db_session: Session) -> None:
    run = make_run(db_session)
    job = make_job(db_session, run)
    claim = claim_job(db_session, job.id, worker="a", lease=LEASE)
    assert claim is not None
    run.status = RunStatus.PAUSED
    db_session.commit()
    assert finish_job(db_session, claim)
    db_session.refresh(run)
    assert run.status == RunStatus.PAUSED


# --- a job given back while its run is cancelled --------------------------------------------


def test_a_job_released_in_a_cancelled_run_is_cancelled(db_session: Session) -> None:
    run = make_run(db_session)
    job = make_job(db_session, run)
    claim = claim_job(db_session, job.id, worker="a", lease=LEASE)
    assert claim is not None
    assert cancel_run(db_session, run) == 0  # a running job is left to finish

    assert release_job(db_session, claim, "CUDA out of memory") is True

    row = reload(db_session, job)
    assert row.status == JobStatus.CANCELLED  # not pending: nothing would ever run it
    assert row.error == "CUDA out of memory"
    assert row.finished_at is not None and row.lease_expires_at is None


def test_a_job_released_in_an_active_run_is_pending_again(db_session: Session) -> None:
    job = make_job(db_session)
    claim = claim_job(db_session, job.id, worker="a", lease=LEASE)
    assert claim is not None

    assert release_job(db_session, claim, "CUDA out of memory") is True

    row = reload(db_session, job)
    assert (row.status, row.error, row.finished_at) == (
        JobStatus.PENDING,
        "CUDA out of memory",
        None,
    )


def test_the_reaper_cancels_expired_jobs_of_a_cancelled_run(db_session: Session) -> None:
    cancelled_run, active_run = make_run(db_session), make_run(db_session)
    lost, other = make_job(db_session, cancelled_run), make_job(db_session, active_run)
    for job in (lost, other):
        assert claim_job(db_session, job.id, worker=f"w{job.id}", lease=LEASE) is not None
        expire_lease(db_session, job.id)
    cancel_run(db_session, cancelled_run)

    report = reap_expired(db_session, max_attempts=3)

    assert (report.requeued, report.dead, report.cancelled) == ([other.id], [], [lost.id])
    row = reload(db_session, lost)
    assert row.status == JobStatus.CANCELLED
    assert row.error == f"lease expired: worker w{lost.id} stopped during attempt 1"
    assert row.finished_at is not None
    assert reload(db_session, other).status == JobStatus.PENDING


# --- backoff between attempts, outages apart ------------------------------------------------

BACKOFF = RetryBackoff(base=10.0, cap=40.0)


def test_a_released_job_waits_out_its_backoff_before_it_can_be_claimed(
    db_session: Session,
) -> None:
    job = make_job(db_session)
    claim = claim_job(db_session, job.id, worker="a", lease=LEASE)
    assert claim is not None
    before = utcnow()

    assert release_job(db_session, claim, "CUDA out of memory", retry_in=timedelta(minutes=2))

    row = reload(db_session, job)
    assert row.status == JobStatus.PENDING and row.retry_at is not None
    assert before + timedelta(minutes=2) <= row.retry_at <= utcnow() + timedelta(minutes=2)
    # A stray message (a duplicate, a redelivery) does not cut the pause short ...
    assert claim_job(db_session, job.id, worker="b", lease=LEASE) is None
    # ... the dispatcher publishes it when the pause is over (queued: claimable).
    db_session.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.QUEUED))
    db_session.commit()
    again = claim_job(db_session, job.id, worker="b", lease=LEASE)
    assert again is not None and again.attempt == 2
    assert reload(db_session, job).retry_at is None


def test_attempts_that_ended_on_an_outage_are_not_counted(db_session: Session) -> None:
    job = make_job(db_session)
    for attempt in (1, 2, 3, 4):  # four outages in a row, max_attempts 2: never out of tries
        claim = claim_job(db_session, job.id, worker="a", lease=LEASE, max_attempts=2)
        assert claim is not None
        assert (claim.attempt, claim.outages, claim.counted_attempts) == (attempt, attempt - 1, 1)
        assert release_job(db_session, claim, "storage unreachable", outage=True)
    row = reload(db_session, job)
    assert (row.attempts, row.outages, row.status) == (4, 4, JobStatus.PENDING)
    # A failure of the job's own is counted: the next claim is its second counted attempt,
    # and the one after that is refused (bury_exhausted would make it dead).
    claim = claim_job(db_session, job.id, worker="a", lease=LEASE, max_attempts=2)
    assert claim is not None and claim.counted_attempts == 1
    assert release_job(db_session, claim, "CUDA out of memory")
    claim = claim_job(db_session, job.id, worker="a", lease=LEASE, max_attempts=2)
    assert claim is not None and claim.counted_attempts == 2
    assert release_job(db_session, claim, "CUDA out of memory")
    assert claim_job(db_session, job.id, worker="a", lease=LEASE, max_attempts=2) is None


def test_the_reaper_spreads_requeued_jobs_over_their_backoff(db_session: Session) -> None:
    run = make_run(db_session)
    jobs = [make_job(db_session, run) for _ in range(8)]
    for job in jobs:
        assert claim_job(db_session, job.id, worker="w", lease=LEASE) is not None
        expire_lease(db_session, job.id)
    second = jobs[0]  # its second attempt lost its worker too: a longer pause
    db_session.execute(update(Job).where(Job.id == second.id).values(attempts=2))
    db_session.commit()
    before = utcnow()

    report = reap_expired(db_session, max_attempts=3, backoff=BACKOFF)

    assert report.requeued == sorted(job.id for job in jobs)
    pauses = {
        job.id: (reload(db_session, job).retry_at - before).total_seconds()  # type: ignore[operator]
        for job in jobs
    }
    assert 10 <= pauses[second.id] <= 20.5  # attempt 2: between half of 20 s and 20 s
    first_attempts = [pauses[job.id] for job in jobs[1:]]
    assert all(5 <= pause <= 10.5 for pause in first_attempts)  # attempt 1: 5 to 10 s
    assert len({round(pause, 3) for pause in first_attempts}) > 1  # jittered, not in step


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    assert [BACKOFF.ceiling(n) for n in (0, 1, 2, 3, 4, 10, 100)] == [10, 10, 20, 40, 40, 40, 40]
    rng = random.Random(7)
    draws = [BACKOFF.seconds(3, rng) for _ in range(200)]
    assert all(20 <= draw <= 40 for draw in draws)
    assert max(draws) - min(draws) > 15


# --- races on real connections (see tests/races.py) -----------------------------------------


@pytest.fixture
def committed_engine(fresh_database_url: str) -> Iterator[Engine]:
    engine = create_engine(fresh_database_url, pool_size=4)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("first", ["release", "cancel"])
def test_release_racing_cancel_leaves_the_job_cancelled(
    committed_engine: Engine, first: str
) -> None:
    """Whichever commits first, a job given back while its run is cancelled ends cancelled:
    release and cancel serialise on the run's row."""
    with Session(committed_engine, expire_on_commit=False) as session:
        run = make_run(session)
        job = make_job(session, run)
        claim = claim_job(session, job.id, worker="a", lease=LEASE)
        assert claim is not None
        run_id = run.id

    def release(session: Session) -> bool:
        return release_job(session, claim, "worker shutting down")

    def cancel(session: Session) -> int:
        run = session.get(Run, run_id)
        assert run is not None
        return cancel_run(session, run)

    if first == "release":
        released_first = race(committed_engine, release, cancel, hold_after="UPDATE jobs")
        released, cancelled = released_first.first, released_first.second
        second_waited = released_first.second_waited
    else:
        cancelled_first = race(committed_engine, cancel, release, hold_after="UPDATE jobs")
        cancelled, released = cancelled_first.first, cancelled_first.second
        second_waited = cancelled_first.second_waited

    assert released is True
    with Session(committed_engine) as session:
        row = session.get(Job, job.id)
        assert row is not None
        assert row.status == JobStatus.CANCELLED, "a pending job in a cancelled run never runs"
        run_row = session.get(Run, run_id)
        assert run_row is not None and run_row.status == RunStatus.CANCELLED
    # The one that came second waited for the first's commit.
    assert second_waited
    # Released first, the job was pending when cancel ran: cancel counts it.
    assert cancelled == (1 if first == "release" else 0)
