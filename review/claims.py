"""Claiming the next item as the pages and the API do it: from the queue, and when the queue
looks empty, after syncing the run's newly finished items."""

from __future__ import annotations

from sqlalchemy.orm import Session

from review.deps import ReviewState
from review.intake import sync_now
from review.queue import claim_next
from review.views import get_run


def claim_for(state: ReviewState, session: Session, run_id: int, reviewer_id: int) -> int | None:
    get_run(session, run_id)  # NotFoundError for an unknown run
    claimed = claim_next(session, run_id=run_id, reviewer_id=reviewer_id, lease=state.lease)
    if claimed is None and sync_now(state, run_id):
        claimed = claim_next(session, run_id=run_id, reviewer_id=reviewer_id, lease=state.lease)
    return claimed
