"""Two database sessions racing at a chosen point, for tests of row locking on real Postgres.

:func:`race` runs ``first`` in a thread of its own and holds it just before it commits (once
it has run a statement containing ``hold_after``), runs ``second`` in another thread, and
lets ``first`` commit once ``second`` has finished or is waiting for a lock. Without a lock
between them ``second`` runs entirely inside ``first``'s open transaction: that is the race.
With one, ``second`` waits for ``first``'s commit and then sees it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

First = TypeVar("First")
Second = TypeVar("Second")


@dataclass(frozen=True)
class RaceResult(Generic[First, Second]):
    first: First
    second: Second
    # True if ``second`` was seen waiting for a lock while ``first`` held its transaction open.
    second_waited: bool


class _HoldBeforeCommit:
    """Engine events that stop one thread's commit (after a matching statement) until
    released."""

    def __init__(self, engine: Engine, hold_after: str, timeout: float) -> None:
        self.engine = engine
        self.hold_after = hold_after.lower()
        self.timeout = timeout
        self.thread: int | None = None
        self.armed = False
        self.held = threading.Event()
        self.release = threading.Event()

    def __enter__(self) -> _HoldBeforeCommit:
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)

    def _statement(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if threading.get_ident() == self.thread and self.hold_after in statement.lower():
            self.armed = True

    def _commit(self, _conn: Any) -> None:
        if threading.get_ident() == self.thread and self.armed and not self.held.is_set():
            self.held.set()
            if not self.release.wait(self.timeout):
                raise TimeoutError("the race's first session was never released")


def _waiting_for_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        waiting = conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


def race(
    engine: Engine,
    first: Callable[[Session], First],
    second: Callable[[Session], Second],
    *,
    hold_after: str,
    timeout: float = 10.0,
) -> RaceResult[First, Second]:
    """Run ``first`` up to the commit that follows its first statement containing
    ``hold_after`` (case-insensitive SQL text, e.g. "UPDATE jobs"), then ``second`` while
    ``first``'s transaction is open; ``first`` commits once ``second`` has ended or waits for
    a lock. Each gets a session of its own; an exception in either is raised here."""
    sessions = sessionmaker(engine, expire_on_commit=False)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    done = {"first": threading.Event(), "second": threading.Event()}

    def actor(name: str, body: Callable[[Session], Any], hold: _HoldBeforeCommit | None) -> None:
        try:
            if hold is not None:
                hold.thread = threading.get_ident()
            with sessions() as session:
                results[name] = body(session)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            done[name].set()

    with _HoldBeforeCommit(engine, hold_after, timeout) as hold:
        first_thread = threading.Thread(target=actor, args=("first", first, hold))
        first_thread.start()
        deadline = time.monotonic() + timeout
        while not hold.held.wait(0.01):
            if done["first"].is_set() or time.monotonic() > deadline:
                first_thread.join(timeout)
                if errors:
                    raise errors[0]
                pytest.fail(f"the first session never committed after running {hold_after!r}")

        second_thread = threading.Thread(target=actor, args=("second", second, None))
        second_thread.start()
        second_waited = False
        while not done["second"].wait(0.02):
            if _waiting_for_lock(engine):
                second_waited = True
                break
            if time.monotonic() > deadline:
                pytest.fail("the second session neither ended nor waited for a lock")
        hold.release.set()
        first_thread.join(timeout)
        second_thread.join(timeout)
    if first_thread.is_alive() or second_thread.is_alive():
        pytest.fail("a session of the race hung")
    if errors:
        raise errors[0]
    return RaceResult(results["first"], results["second"], second_waited)
