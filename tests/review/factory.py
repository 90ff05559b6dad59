"""Runs with rendered images, written straight into the database (and PNGs into storage), as
the producer and the workers would have left them."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image as PILImage
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Image, Job, JobStatus, Run, RunStatus, SafetyStatus
from pixelmill.identity import dedupe_key
from pixelmill.seeds import seed_sweep
from pixelmill.storage import Storage


def png_bytes(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class MadeRun:
    run: Run
    items: list[CatalogueItem] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)

    def images_of(self, item: CatalogueItem) -> list[Image]:
        job_ids = {job.id for job in self.jobs if job.item_id == item.id}
        return [image for image in self.images if image.job_id in job_ids]


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
    run = Run(name=name, source="test.csv", status=run_status)
    session.add(run)
    session.flush()
    made = MadeRun(run)
    for number in range(items):
        key = f"{key_prefix}{number:03d}"
        item = CatalogueItem(
            source="test.csv",
            external_key=key,
            fields={"sku": key, "title": f"Item {number}"},
            content_hash=f"{name}-{key}",
        )
        session.add(item)
        session.flush()
        made.items.append(item)
        for template in templates:
            for variant in variants:
                values = {
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
                job = Job(
                    run_id=run.id,
                    item_id=item.id,
                    status=job_status,
                    dedupe_key=dedupe_key(values, salt=name),
                    **values,
                )
                session.add(job)
                session.flush()
                made.jobs.append(job)
                if job_status == JobStatus.DONE:
                    made.images.extend(
                        add_images(session, job, storage, flagged=flagged_seeds, thumbs=thumbnails)
                    )
    session.commit()
    return made


def add_images(
    session: Session,
    job: Job,
    storage: Storage | None,
    *,
    flagged: int = 0,
    thumbs: bool = False,
) -> list[Image]:
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
        image = Image(
            job_id=job.id,
            seed=seed,
            storage_key=key,
            sha256="0" * 64,
            width=64,
            height=64,
            bytes=len(data),
            safety=SafetyStatus.FLAGGED if is_flagged else SafetyStatus.SAFE,
            thumbnail_key=thumb_key,
            render_seconds=0.1,
        )
        session.add(image)
        images.append(image)
    session.flush()
    return images
