"""A rendered job's tail, finished in the background while the next job renders.

When a job's last batch leaves the GPU, what remains is CPU and I/O: encoding and uploading
that batch, recording its rows, marking the job ``done``. Waiting for it before taking the
next message left the GPU idle for that long after every job (about 150 ms per job for SD 1.5
on an H200). The Celery task therefore returns once the GPU is done and the tail finishes on
this thread while the next job loads its inputs and renders.

Nothing is lost by answering early: the job stays ``running`` under its lease (the heartbeat
keeps beating) until the tail commits ``done``. If the process dies first, the lease expires,
the dispatcher re-queues the job and the next attempt renders only the seeds that have no row.

One tail at a time: deferring a tail first waits for the previous one, so at most one job's
images are held in memory, and a pool process drains its tail before it exits.

A tail that hangs (a database connection whose server vanished, say) must not hold its job
for ever: past its deadline its ``overdue`` callback runs (the job's heartbeat stops, so the
lease expires and the job is re-queued; whatever the tail writes later is fenced off). And a
task's soft time limit raised while it waits for the previous tail ends that task, as it
would anywhere else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures

log = logging.getLogger(__name__)

# What a tail reports: the job's outcome ("done", "retry", "dead", ...).
Finish = Callable[[], str]


class JobTails:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-tail")
        self._pending: Future[str] | None = None

    def defer(
        self,
        finish: Finish,
        *,
        deadline: float | None = None,
        overdue: Callable[[], None] | None = None,
    ) -> None:
        """Run ``finish`` in the background, after the previous tail has ended. If it has not
        ended ``deadline`` seconds after it started, ``overdue`` is called (once)."""
        self.wait()

        def run() -> str:
            timer = None
            if deadline is not None and overdue is not None:
                timer = threading.Timer(deadline, _overdue, args=(overdue, deadline))
                timer.daemon = True
                timer.start()
            try:
                return finish()
            finally:
                if timer is not None:
                    timer.cancel()

        self._pending = self._executor.submit(run)

    def wait(self, timeout: float | None = None) -> str | None:
        """Wait for the tail in flight, if any; its outcome (None when there was none, it
        failed, or it did not end within ``timeout``).

        Nothing raised while waiting is caught (a Celery soft time limit ends the task); a
        tail's own error is logged, since the tail has handled its job already.
        """
        pending = self._pending
        if pending is None:
            return None
        done, _ = wait_for_futures([pending], timeout)
        if not done:
            log.warning("a job's tail did not finish within %s s", timeout)
            return None
        self._pending = None
        error = pending.exception()
        if error is not None:
            # A tail handles its job's errors itself; this is a bug, and the job's lease
            # covers it (it is re-queued when the lease expires).
            log.error("a job's tail failed", exc_info=error)
            return None
        return pending.result()


def _overdue(overdue: Callable[[], None], deadline: float) -> None:
    log.error("a job's tail has run for %s s: giving its job up to the lease's expiry", deadline)
    overdue()
