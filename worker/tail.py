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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

# What a tail reports: the job's outcome ("done", "retry", "dead", ...).
Finish = Callable[[], str]


class JobTails:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-tail")
        self._pending: Future[str] | None = None

    def defer(self, finish: Finish) -> None:
        """Run ``finish`` in the background, after the previous tail has ended."""
        self.wait()
        self._pending = self._executor.submit(finish)

    def wait(self, timeout: float | None = None) -> str | None:
        """Wait for the tail in flight, if any; its outcome (None when there was none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result(timeout)
        except Exception:
            # A tail handles its job's errors itself; this is a bug or the timeout, and the
            # job's lease covers it (it is re-queued when the lease expires).
            log.exception("a job's tail did not finish")
            return None
