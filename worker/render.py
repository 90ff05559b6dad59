"""Render one job: claim it, render each seed, store the PNG, record the image, finish.

Every image is durable (object stored, row committed) before the next seed renders, so a job
interrupted half-way resumes where it stopped and never records a seed twice.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import pixelmill
from db.models import Image, SafetyStatus
from db.upsert import insert_ignoring_conflicts
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from worker.claim import ClaimedJob, claim_job, extend_lease, fail_job, finish_job
from worker.models import resolve_model

if TYPE_CHECKING:
    from worker.pipeline import PipelineCache, RenderedImage

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """What one worker process keeps between jobs."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    pipelines: PipelineCache
    name: str


def image_key(job: ClaimedJob, seed: int, sha256: str) -> str:
    # The content hash is part of the key: if a worker that lost its lease renders the same
    # seed as its successor (GPU renders need not be bit-exact), each uploads its own object
    # and the one recorded row always points at the bytes its sha256 describes.
    return f"runs/{job.run_id}/jobs/{job.id}/{seed}-{sha256[:16]}.png"


def render_job(runtime: WorkerRuntime, job_id: int) -> str:
    """Returns what happened: ``done``, ``skipped`` (not claimable) or ``failed``."""
    lease = timedelta(seconds=runtime.settings.job_lease_seconds)
    with runtime.sessions() as session:
        job = claim_job(session, job_id, worker=runtime.name, lease=lease)
        if job is None:
            log.info("job %s is not claimable (done, running elsewhere or run inactive)", job_id)
            return "skipped"
        try:
            _render_claimed(runtime, session, job, lease)
        except Exception as exc:
            session.rollback()
            log.exception("job %s failed", job_id)
            if not fail_job(session, job, f"{type(exc).__name__}: {exc}"):
                log.warning("job %s was taken over by another worker before it failed", job_id)
                return "skipped"
            return "failed"
        if not finish_job(session, job):
            log.warning("job %s was taken over by another worker before it finished", job_id)
            return "skipped"
    return "done"


def _render_claimed(
    runtime: WorkerRuntime, session: Session, job: ClaimedJob, lease: timedelta
) -> None:
    from worker.pipeline import RenderParams, check_inputs, render_seed, scheduler_label
    from worker.png import a1111_parameters, encode_png

    params = RenderParams(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        steps=job.steps,
        guidance=job.guidance,
        width=job.width,
        height=job.height,
        scheduler=job.scheduler,
    )
    check_inputs(params)
    done = set(session.scalars(select(Image.seed).where(Image.job_id == job.id)))
    todo = [seed for seed in job.seeds if seed not in done]
    if not todo:
        return
    pipe = runtime.pipelines.get(resolve_model(job.model, runtime.settings))
    for seed in todo:
        rendered = render_seed(pipe, params, seed)
        parameters = a1111_parameters(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            steps=job.steps,
            sampler=scheduler_label(job.scheduler, pipe=pipe),
            cfg_scale=job.guidance,
            seed=seed,
            width=job.width,
            height=job.height,
            model_name=job.model,
            model_hash=None,
            version=f"pixelmill {pixelmill.__version__}",
        )
        png = encode_png(rendered.image, parameters=parameters)
        sha256 = hashlib.sha256(png).hexdigest()
        key = image_key(job, seed, sha256)
        runtime.storage.put(key, png, content_type="image/png")
        _record_image(session, job, seed, key, png, sha256, rendered)
        if not extend_lease(session, job, lease):
            raise RuntimeError("lost the job's lease to another worker")


def _record_image(
    session: Session,
    job: ClaimedJob,
    seed: int,
    key: str,
    png: bytes,
    sha256: str,
    rendered: RenderedImage,
) -> None:
    if rendered.nsfw is None:
        safety = SafetyStatus.UNCHECKED
    else:
        safety = SafetyStatus.FLAGGED if rendered.nsfw else SafetyStatus.SAFE
    insert_ignoring_conflicts(
        session,
        Image,
        [
            {
                "job_id": job.id,
                "seed": seed,
                "storage_key": key,
                "sha256": sha256,
                "width": rendered.image.width,
                "height": rendered.image.height,
                "bytes": len(png),
                "safety": safety.value,
                "render_seconds": rendered.seconds,
            }
        ],
    )
    session.commit()
