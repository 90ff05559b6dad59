"""Rows for tests, written straight into the database as the producer, the workers and the
review app would have left them: runs, catalogue items, jobs, images and reviewers.

Each factory takes a Session, fills what the test does not care about with plain defaults
(names, dedupe keys and content hashes unique per call) and takes keyword overrides for what
it does. Runs, items and images are flushed, not committed; jobs are committed unless
``commit=False`` (tests that race or use other connections need them visible).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from PIL import Image as PILImage
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Image, Job, JobStatus, Reviewer, Run, RunStatus, SafetyStatus
from pixelmill.storage import Storage
from review.accounts import add_reviewer

# A job that renders quickly on the tiny test model, unless a test says otherwise.
JOB_DEFAULTS: dict[str, Any] = {
    "template": "studio",
    "prompt": "a brass lamp on a table",
    "negative_prompt": "blurry",
    "model": "tiny",
    "scheduler": None,
    "steps": 2,
    "guidance": 7.5,
    "width": 64,
    "height": 64,
    "status": JobStatus.QUEUED,
}


def unique_hex() -> str:
    """64 hex characters, new on every call: the length of a dedupe key or content hash."""
    return uuid.uuid4().hex * 2


def make_run(
    session: Session,
    status: str = RunStatus.ACTIVE,
    *,
    name: str = "",
    priority: int = 0,
    source: str = "test",
) -> Run:
    """A run (flushed); its name is unique unless given."""
    run = Run(
        name=name or f"run-{uuid.uuid4().hex}",
        source=source,
        status=status,
        priority=priority,
    )
    session.add(run)
    session.flush()
    return run


def make_item(
    session: Session,
    *,
    source: str = "test",
    external_key: str = "",
    fields: dict[str, Any] | None = None,
    content_hash: str = "",
) -> CatalogueItem:
    """A catalogue item (flushed); its key and content hash are unique unless given."""
    item = CatalogueItem(
        source=source,
        external_key=external_key or f"sku-{uuid.uuid4().hex[:8]}",
        fields=fields if fields is not None else {"name": "lamp"},
        content_hash=content_hash or unique_hex(),
    )
    session.add(item)
    session.flush()
    return item


def make_job(
    session: Session,
    run: Run | None = None,
    *,
    item: CatalogueItem | None = None,
    seeds: Sequence[int] = (1, 2, 3),
    commit: bool = True,
    **overrides: Any,
) -> Job:
    """A job of ``run`` (a new active run if none) for ``item`` (a new item if none), with
    JOB_DEFAULTS and a unique dedupe key unless overridden. Commits unless ``commit=False``."""
    run = run if run is not None else make_run(session)
    item = item if item is not None else make_item(session)
    values: dict[str, Any] = {**JOB_DEFAULTS, "dedupe_key": unique_hex(), **overrides}
    job = Job(run_id=run.id, item_id=item.id, seeds=list(seeds), **values)
    session.add(job)
    if commit:
        session.commit()
    else:
        session.flush()
    return job


def make_jobs(
    session: Session,
    run: Run,
    count: int,
    *,
    status: str = JobStatus.PENDING,
    queued_at: datetime | None = None,
    seeds_per_job: int = 1,
) -> list[int]:
    """``count`` committed jobs of one item, for the dispatcher and run operations; job i has
    seeds i, i + 100, ... Their ids in order."""
    item = make_item(session, source="test.csv", fields={"sku": "x"})
    jobs = [
        make_job(
            session,
            run,
            item=item,
            commit=False,
            template="t",
            prompt=f"prompt {i}",
            negative_prompt="",
            model="m",
            guidance=5.0,
            seeds=[i + 100 * k for k in range(seeds_per_job)],
            status=status,
            queued_at=queued_at,
        )
        for i in range(count)
    ]
    session.commit()
    return [job.id for job in jobs]


def add_job(
    session: Session, run: Run, status: str, seeds: list[int], error: str | None = None
) -> Job:
    """A flushed job of its own item, for the tests that only count jobs by status and seeds."""
    item = make_item(session, source="s", fields={})
    return make_job(
        session,
        run,
        item=item,
        commit=False,
        template="t",
        prompt="p",
        negative_prompt="",
        model="m",
        guidance=7.0,
        seeds=seeds,
        status=status,
        error=error,
    )


def image_row(job_id: int, seed: int, **overrides: Any) -> Image:
    """An image row of a 64x64 render (not added to any session)."""
    values: dict[str, Any] = {
        "storage_key": f"k/{job_id}/{seed}",
        "sha256": "x" * 64,
        "width": 64,
        "height": 64,
        "bytes": 10,
        "safety": SafetyStatus.SAFE,
        "render_seconds": 0.1,
        **overrides,
    }
    return Image(job_id=job_id, seed=seed, **values)


def png_bytes(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def add_images(
    session: Session,
    job: Job,
    storage: Storage | None,
    *,
    flagged: int = 0,
    thumbs: bool = False,
) -> list[Image]:
    """One image row per seed of ``job`` (the first ``flagged`` flagged and under quarantine/),
    each a PNG of its own colour, stored in ``storage`` (with a thumbnail if ``thumbs``) when one
    is given. Flushes."""
    images = []
    for index, seed in enumerate(job.seeds):
        colour = ((job.id * 40) % 256, (index * 60) % 256, (seed % 200) + 30)
        data = png_bytes(colour)
        key = f"runs/{job.run_id}/jobs/{job.id}/{seed}.png"
        is_flagged = index < flagged
        if is_flagged:
            key = "quarantine/" + key
        thumb_key = None
        if storage is not None:
            storage.put(key, data, content_type="image/png")
            if thumbs:
                thumb_key = key.replace(".png", ".thumb.png")
                storage.put(thumb_key, png_bytes(colour, 32), content_type="image/png")
        image = image_row(
            job.id,
            seed,
            storage_key=key,
            sha256="0" * 64,
            bytes=len(data),
            safety=SafetyStatus.FLAGGED if is_flagged else SafetyStatus.SAFE,
            thumbnail_key=thumb_key,
        )
        session.add(image)
        images.append(image)
    session.flush()
    return images


def make_reviewer(
    session: Session, name: str = "", *, password: str | None = None, admin: bool = False
) -> Reviewer:
    """A reviewer. With ``password``, an account made as the review app makes one (hashed,
    committed, able to log in); without, a flushed row whose hash matches no password, for
    tests that only need a reviewer's id."""
    name = name or f"reviewer-{uuid.uuid4().hex[:8]}"
    if password is not None:
        return add_reviewer(session, name, password, admin=admin)
    reviewer = Reviewer(name=name, password_hash="x", is_admin=admin)
    session.add(reviewer)
    session.flush()
    return reviewer
