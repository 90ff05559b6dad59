"""Runs with decided keepers, for the channel export's tests: rendered-looking images (noise,
which compresses as badly as a photo) in storage, reviewed and submitted as a reviewer
would."""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from db.models import Decision, ReviewItem
from pixelmill.storage import Storage
from review.queue import claim_next, decide, submit, sync_queue
from tests.review.factory import MadeRun, make_run

LEASE = timedelta(minutes=10)


def noise_png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def run_with_keepers(
    session: Session,
    storage: Storage,
    reviewer_id: int,
    *,
    items: int = 2,
    open_items: int = 0,
    size: tuple[int, int] = (96, 64),
) -> MadeRun:
    """A run of ``items + open_items`` items of two images each: the first image of each item
    kept and submitted for ``items`` of them; of the ``open_items`` others, one is decided
    but not submitted and the rest not reviewed (neither is exported). Images are noise of
    ``size``. Commits."""
    made = make_run(
        session, items=items + open_items, templates=("studio",), seeds=2, storage=storage
    )
    for number, image in enumerate(made.images):
        storage.put(image.storage_key, noise_png(*size, seed=number), content_type="image/png")
    sync_queue(session)
    for number in range(items + min(open_items, 1)):
        item_id = claim_next(session, run_id=made.run.id, reviewer_id=reviewer_id, lease=LEASE)
        assert item_id is not None
        review_item = session.get(ReviewItem, item_id)
        assert review_item is not None
        item = next(i for i in made.items if i.id == review_item.item_id)
        first, *rest = made.images_of(item)
        decide(session, item_id, first.id, Decision.KEEP, reviewer_id=reviewer_id, lease=LEASE)
        for image in rest:
            decide(
                session, item_id, image.id, Decision.REJECT, reviewer_id=reviewer_id, lease=LEASE
            )
        if number < items:
            submit(session, item_id, reviewer_id=reviewer_id, lease=LEASE)
    return made
