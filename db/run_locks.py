"""The run's row lock, and the rule that finishes a run.

Lock order. Whatever changes a run's status, or adds or ends jobs in a way that depends on it,
locks the run's row (:func:`lock_run`) so that those changes happen one at a time and each sees
the others' commits: pause, resume and cancel (producer.runs), the dispatcher (FOR SHARE,
producer.dispatch), a produce and a re-roll adding jobs (producer.produce, review.reroll) and
a job ending or given back (worker.claim). A transaction that locks *pending or queued* job
rows and the run's row takes the run's row first (pause, cancel, the dispatcher,
worker.claim.bury_exhausted). Transactions that end or give back a *running* job lock the
job's row first (the fenced update) and the run's row after: that cannot deadlock with the
others, because nothing that holds a run's row then waits for a running job's row (pause and
cancel update only pending and queued jobs; the dispatcher skips locked rows).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, bindparam, select, update
from sqlalchemy.orm import Session

from db.models import OPEN_JOB_STATUSES, Job, Run, RunStatus, utcnow


def lock_run(session: Session, run_id: int) -> str | None:
    """Lock the run's row until the transaction ends and return its status as last committed
    (None if there is no such run). See the lock order in this module's docstring.

    FOR NO KEY UPDATE, not FOR UPDATE: it excludes the others that change the run (and the
    dispatcher's FOR SHARE) but not the key-share lock a job insert takes on its run's row,
    so a long produce adding jobs to the run does not hold up a worker finishing one.
    SQLite ignores it; it runs one writer at a time anyway."""
    status: str | None = _core_scalar(session, _LOCK_RUN, {"lock_run_id": run_id})
    return status


# Built once, the run's id a parameter: a worker locks its run's row for every job it ends, and
# building and hashing the statement each time cost more than running it.
_LOCK_RUN = (
    select(Run.status).where(Run.id == bindparam("lock_run_id")).with_for_update(key_share=True)
)
_OPEN_JOB = (
    select(Job.id)
    .where(Job.run_id == bindparam("open_run_id"), Job.status.in_(OPEN_JOB_STATUSES))
    .limit(1)
)


def _core_scalar(session: Session, statement: Select[Any], parameters: dict[str, Any]) -> Any:
    """``session.scalar`` without the ORM's layer, which these plain column reads do not need
    (the session's pending changes are flushed first, as its autoflush would)."""
    session.flush()
    return session.connection().scalar(statement, parameters)


def lock_loaded_run(session: Session, run: Run) -> None:
    """:func:`lock_run` for a run already loaded: lock its row the same way and reload it,
    so its attributes are the last committed ones until the transaction ends."""
    session.refresh(run, with_for_update={"key_share": True})


def finish_run_if_complete(session: Session, run_id: int) -> bool:
    """Mark an active run with no open jobs left ``finished`` (the last of its jobs to end
    does this, and so does resuming a run whose jobs all ended while it was paused). True if
    it did. Does not commit.

    The run's row is locked before the open jobs are counted, in a statement of its own: a
    transaction adding jobs to the run (a re-roll) holds that lock until it commits, so the
    count, which sees what was committed before it started, includes them."""
    if lock_run(session, run_id) != RunStatus.ACTIVE:
        return False
    open_job = _core_scalar(session, _OPEN_JOB, {"open_run_id": run_id})
    if open_job is not None:
        return False
    session.execute(
        update(Run).where(Run.id == run_id).values(status=RunStatus.FINISHED, finished_at=utcnow())
    )
    return True
