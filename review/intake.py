"""Keeping the queue filled: a background thread syncs every run's items every
PIXELMILL_REVIEW_SYNC_SECONDS, and a reviewer who finds a run's queue empty triggers a sync of
that run at once (at most every ON_DEMAND_SECONDS per run and process). With
PIXELMILL_AUTO_REJECT_BELOW set, the thread also lets the keeper model reject what it predicts
below it among the open items (review.ranking.auto_reject): in the background, never while a
reviewer waits."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session

from review.deps import ReviewState
from review.queue import sync_queue
from review.ranking.auto_reject import make_auto_rejects

log = logging.getLogger(__name__)

ON_DEMAND_SECONDS = 2.0


def sync_now(state: ReviewState, run_id: int) -> bool:
    """Sync one run unless that was done within ON_DEMAND_SECONDS; True if it ran."""
    with state.sync_lock:
        last = state.last_sync.get(run_id)
        now = time.monotonic()
        if last is not None and now - last < ON_DEMAND_SECONDS:
            return False
        state.last_sync[run_id] = now
    with state.sessions() as session:
        sync_queue(session, run_id)
    return True


class SyncThread:
    def __init__(self, state: ReviewState, interval: float) -> None:
        self.state = state
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="review-sync", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.state.sessions() as session:
                    report = sync_queue(session)
                    rejected = self._auto_reject(session)
                if report.added or report.reopened:
                    log.info(
                        "review queue: %d items added, %d reopened", report.added, report.reopened
                    )
                if rejected:
                    log.info("review queue: %d images rejected by the keeper model", rejected)
            except Exception:  # the database may be down for a moment: try again later
                log.exception("review queue sync failed")
            self.stopping.wait(self.interval)

    def _auto_reject(self, session: Session) -> int:
        threshold = self.state.settings.auto_reject_below
        if threshold is None:
            return 0
        made = make_auto_rejects(session, threshold)
        session.commit()
        return made
