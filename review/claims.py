"""Claiming the next item as the pages and the API do it: from the queue, and when the queue
looks empty, after syncing the run's newly finished items."""

from __future__ import annotations

from sqlalchemy.orm import Session

from review.deps import ReviewState
from review.intake import sync_now
from review.queue import claim_next
from review.views import get_run


def claim_for(
    state: ReviewState,
    session: Session,
    run_id: int,
    reviewer_id: int,
    *,
    besides: int | None = None,
) -> int | None:
    get_run(session, run_id)  # NotFoundError for an unknown run
    lease = state.lease
    claimed = claim_next(
        session, run_id=run_id, reviewer_id=reviewer_id, lease=lease, besides=besides
    )
    if claimed is None and sync_now(state, run_id):
        claimed = claim_next(
            session, run_id=run_id, reviewer_id=reviewer_id, lease=lease, besides=besides
        )
    return claimed
