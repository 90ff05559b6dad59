"""Runs with rendered images, written straight into the database (and PNGs into storage), as
the producer and the workers would have left them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from db.models import CatalogueItem, Image, Job, JobStatus, Run, RunStatus
from pixelmill.identity import dedupe_key
from pixelmill.seeds import seed_sweep
from pixelmill.storage import Storage
from tests import factories


@dataclass
class MadeRun:
    run: Run
    items: list[CatalogueItem] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)

    def images_of(self, item: CatalogueItem) -> list[Image]:
        job_ids = {job.id for job in self.jobs if job.item_id == item.id}
        return [image for image in self.images if image.job_id in job_ids]


def distinct_files(images: list[Image]) -> list[Image]:
    """Each image its own sha256, as distinct renders have: the grid groups identical files
    as duplicates, and tests.factories gives every image the same placeholder."""
    for image in images:
        image.sha256 = hashlib.sha256(image.storage_key.encode()).hexdigest()
    return images


def make_run(
    session: Session,
    *,
    name: str = "night-1",
    items: int = 3,
    templates: tuple[str, ...] = ("studio", "outdoor"),
    variants: tuple[str, ...] = ("",),
    seeds: int = 2,
    storage: Storage | None = None,
    job_status: JobStatus = JobStatus.DONE,
    flagged_seeds: int = 0,
    run_status: RunStatus = RunStatus.FINISHED,
    thumbnails: bool = False,
    key_prefix: str = "SKU-",
) -> MadeRun:
    """A run whose jobs are ``job_status``; done jobs have one image row per seed (the first
    ``flagged_seeds`` of each job flagged). Commits."""
    run = factories.make_run(session, run_status, name=name, source="test.csv")
    made = MadeRun(run)
    for number in range(items):
        key = f"{key_prefix}{number:03d}"
        item = factories.make_item(
            session,
            source="test.csv",
            external_key=key,
            fields={"sku": key, "title": f"Item {number}"},
            content_hash=f"{name}-{key}",
        )
        made.items.append(item)
        for template in templates:
            for variant in variants:
                values: dict[str, Any] = {
                    "template": template,
                    "variant": variant,
                    "prompt": f"photo of item {number}, {template} {variant}".strip(),
                    "negative_prompt": "blurry",
                    "model": "tiny",
                    "scheduler": None,
                    "steps": 2,
                    "guidance": 7.0,
                    "width": 64,
                    "height": 64,
                    "seeds": seed_sweep(key, template, seeds, variant=variant),
                }
                job = factories.make_job(
                    session,
                    run,
                    item=item,
                    commit=False,
                    status=job_status,
                    dedupe_key=dedupe_key(values, salt=name),
                    **values,
                )
                made.jobs.append(job)
                if job_status == JobStatus.DONE:
                    made.images.extend(
                        distinct_files(
                            factories.add_images(
                                session, job, storage, flagged=flagged_seeds, thumbs=thumbnails
                            )
                        )
                    )
    session.commit()
    return made
