"""A job's heartbeat: a daemon thread that keeps extending its lease while it renders.

The lease says "this worker is alive and owns the job". A render can take longer than the
lease, so while a job renders the heartbeat pushes the lease forward every ``lease / 3``,
through a session of its own (never the render's session: sessions are not thread-safe).
If the job is taken over (the lease expired anyway, the reaper re-queued it), the fenced
update matches nothing: the heartbeat stops and sets :attr:`Heartbeat.lost`, and the render
stops before its next batch of seeds (a batch under way finishes; its rows are fenced off).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from pixelmill.outages import OutageBackoff, RetryBackoff, infrastructure_error
from worker.claim import ClaimedJob, extend_lease

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        job: ClaimedJob,
        lease: timedelta,
        *,
        interval: float | None = None,
    ) -> None:
        self.sessions = sessions
        self.job = job
        self.lease = lease
        self.interval = lease.total_seconds() / 3 if interval is None else interval
        if self.interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0, got {self.interval}")
        self.beats = 0  # successful lease extensions
        self.lost = threading.Event()  # set once the job is no longer ours
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-job-{job.id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop beating; waits for a beat in progress (bounded by ``timeout``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        # After a failed beat (the database away, its connections dropped) the next comes
        # sooner, doubling from one second up to the interval: the lease still has two thirds
        # left, and a short outage must not let it run out.
        failures = OutageBackoff(RetryBackoff(base=min(1.0, self.interval), cap=self.interval))
        pause = self.interval
        while not self._stop.wait(pause):
            try:
                with self.sessions() as session:
                    ours = extend_lease(session, self.job, self.lease)
            except Exception as exc:
                pause = failures.failed()
                log.warning(
                    "job %s: heartbeat failed (%s), retrying in %.1f s",
                    self.job.id,
                    infrastructure_error(exc) or repr(exc),
                    pause,
                )
                continue
            failures.succeeded()
            pause = self.interval
            if not ours:
                log.warning("job %s: lease lost to another worker", self.job.id)
                self.lost.set()
                return
            self.beats += 1
