"""Reviewers asking at the same moment never get the same item (Postgres, real connections)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import ReviewItem, ReviewSync
from review.accounts import add_reviewer
from review.queue import _record_sync, claim_next, sync_queue
from tests.review.factory import make_run

REVIEWERS = 8
ROUNDS = 3


def test_simultaneous_claims_never_share_an_item(
    review_engine: Engine, sessions: sessionmaker[Session], session: Session
) -> None:
    assert review_engine.dialect.name == "postgresql"
    made = make_run(session, items=REVIEWERS * ROUNDS, templates=("studio",), seeds=1)
    sync_queue(session)
    reviewers = [
        add_reviewer(session, f"r{n}", "long enough password").id for n in range(REVIEWERS)
    ]
    barrier = threading.Barrier(REVIEWERS)
    claims: dict[int, list[int | None]] = {r: [] for r in reviewers}
    errors: list[BaseException] = []

    def work(reviewer_id: int) -> None:
        try:
            with sessions() as own:
                for _ in range(ROUNDS):
                    barrier.wait(timeout=30)  # everyone asks at once, every round
                    item = claim_next(
                        own, run_id=made.run.id, reviewer_id=reviewer_id, lease=timedelta(minutes=5)
                    )
                    claims[reviewer_id].append(item)
                    if item is not None:
                        # Done with it: the next round asks for a new one.
                        own.execute(
                            update(ReviewItem)
                            .where(ReviewItem.id == item)
                            .values(status="done", claimed_by=None, claim_expires_at=None)
                        )
                        own.commit()
        except BaseException as exc:  # surfaced below, with the thread's failure
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in reviewers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    got = [item for items in claims.values() for item in items]
    assert None not in got  # there was an item for every request
    assert len(got) == REVIEWERS * ROUNDS
    duplicates = [item for item, count in Counter(got).items() if count > 1]
    assert duplicates == []


def test_simultaneous_claims_with_fewer_items_than_reviewers(
    sessions: sessionmaker[Session], session: Session
) -> None:
    made = make_run(session, items=3, templates=("studio",), seeds=1)
    sync_queue(session)
    reviewers = [add_reviewer(session, f"q{n}", "long enough password").id for n in range(6)]
    barrier = threading.Barrier(len(reviewers))
    results: dict[int, int | None] = {}

    def work(reviewer_id: int) -> None:
        with sessions() as own:
            barrier.wait(timeout=30)
            results[reviewer_id] = claim_next(
                own, run_id=made.run.id, reviewer_id=reviewer_id, lease=timedelta(minutes=5)
            )

    threads = [threading.Thread(target=work, args=(r,)) for r in reviewers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = [item for item in results.values() if item is not None]
    assert len(results) == 6
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 3
    holders = dict(session.execute(select(ReviewItem.id, ReviewItem.claimed_by)).all())
    assert {results[r]: r for r in reviewers if results[r] is not None} == holders


def test_a_runs_first_sync_recorded_twice_at_once(
    sessions: sessionmaker[Session], session: Session
) -> None:
    # Two app processes (or the sync thread and a reviewer's on-demand sync) record a new
    # run's first sync together: the second waits for the first and then updates its row.
    made = make_run(session, items=1, templates=("studio",), seeds=1)
    first = sessions()
    _record_sync(first, made.run.id, None)
    first.flush()  # holds the new row's key, not yet committed
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with sessions() as own:
                _record_sync(own, made.run.id, None)
                own.commit()
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(timeout=1)  # blocked on the first session's uncommitted row
    assert thread.is_alive()
    first.commit()
    first.close()
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []
    assert session.scalar(select(func.count()).select_from(ReviewSync)) == 1
