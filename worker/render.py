"""Render one job: claim it, render each seed, store the PNG, record the image, finish.

Every image is durable (object stored, row committed) before the next seed renders, so a job
interrupted half-way resumes where it stopped and never records a seed twice.

Outcomes: a prompt the blocklist refuses ends ``blocked`` without rendering; a deterministic
input error (bad parameters, a missing model folder) ends ``failed`` at once; any other error
(CUDA out of memory, storage down, the task's time limit) gives the job back as ``pending``
for another attempt, or ends it ``dead`` once it has had ``max_attempts``. Images the safety
checker flags are recorded as ``flagged`` and stored under ``quarantine/`` (or not at all).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import pixelmill
from db.models import Image, JobStatus, SafetyStatus
from db.upsert import insert_ignoring_conflicts
from pixelmill.blocklist import Blocklist, load_blocklist
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from worker.claim import (
    ClaimedJob,
    bury_exhausted,
    claim_job,
    extend_lease,
    fail_job,
    finish_job,
    release_job,
)
from worker.heartbeat import Heartbeat
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
    # The prompt blocklist; None: the one settings name (blocklist_path or the shipped list).
    blocklist: Blocklist | None = None


QUARANTINE_PREFIX = "quarantine/"


class JobInputError(Exception):
    """A deterministic problem with the job itself (its parameters, its model): another
    attempt would fail the same way. The original error is the ``__cause__``."""


class LeaseLostError(RuntimeError):
    pass


def image_key(job: ClaimedJob, seed: int, sha256: str) -> str:
    # The content hash is part of the key: if a worker that lost its lease renders the same
    # seed as its successor (GPU renders need not be bit-exact), each uploads its own object
    # and the one recorded row always points at the bytes its sha256 describes.
    return f"runs/{job.run_id}/jobs/{job.id}/{seed}-{sha256[:16]}.png"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, JobInputError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def render_job(runtime: WorkerRuntime, job_id: int) -> str:
    """Returns what happened: ``done``; ``skipped`` (not claimable, or taken over by another
    worker); ``blocked``; ``failed`` (bad input); ``retry`` (given back for another attempt);
    ``dead`` (out of attempts)."""
    settings = runtime.settings
    lease = timedelta(seconds=settings.job_lease_seconds)
    blocklist = (
        runtime.blocklist
        if runtime.blocklist is not None
        else load_blocklist(settings.blocklist_path)
    )
    with runtime.sessions() as session:
        job = claim_job(
            session, job_id, worker=runtime.name, lease=lease, max_attempts=settings.max_attempts
        )
        if job is None:
            if bury_exhausted(session, job_id, max_attempts=settings.max_attempts):
                log.warning("job %s is dead: out of attempts (%s)", job_id, settings.max_attempts)
                return "dead"
            log.info("job %s is not claimable (done, running elsewhere or run inactive)", job_id)
            return "skipped"

        match = blocklist.check(job.prompt, job.negative_prompt)
        if match is not None:
            log.warning("job %s is blocked by rule %r (%s)", job_id, match.rule, match.source)
            reason = f"blocked by rule {match.rule!r} ({match.source}): matched {match.matched!r}"
            if not fail_job(session, job, reason, status=JobStatus.BLOCKED):
                return "skipped"
            return "blocked"

        heartbeat = Heartbeat(runtime.sessions, job, lease)
        try:
            with heartbeat:
                _render_claimed(runtime, session, job, lease, lost=heartbeat.lost.is_set)
        except Exception as exc:
            session.rollback()
            error = _describe(exc)
            if isinstance(exc, LeaseLostError):
                log.warning("job %s: %s", job_id, exc)
                return "skipped"
            if isinstance(exc, JobInputError):
                log.error("job %s failed: %s", job_id, error)
                status, outcome = JobStatus.FAILED, "failed"
            elif job.attempt >= settings.max_attempts:
                log.exception("job %s failed on its last attempt (%s)", job_id, job.attempt)
                status, outcome = JobStatus.DEAD, "dead"
            else:
                log.exception("job %s failed on attempt %s, to be retried", job_id, job.attempt)
                status, outcome = JobStatus.PENDING, "retry"
            if status == JobStatus.PENDING:
                ours = release_job(session, job, error)
            else:
                ours = fail_job(session, job, error, status=status)
            if not ours:
                log.warning("job %s was taken over by another worker before it ended", job_id)
                return "skipped"
            return outcome
        if not finish_job(session, job):
            log.warning("job %s was taken over by another worker before it finished", job_id)
            return "skipped"
    return "done"


def _render_claimed(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    lease: timedelta,
    *,
    lost: Callable[[], bool] = lambda: False,
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
    try:
        check_inputs(params)
    except ValueError as exc:
        raise JobInputError(str(exc)) from exc
    done = set(session.scalars(select(Image.seed).where(Image.job_id == job.id)))
    todo = [seed for seed in job.seeds if seed not in done]
    if not todo:
        return
    try:
        pipe = runtime.pipelines.get(resolve_model(job.model, runtime.settings))
    except FileNotFoundError as exc:  # no such model folder: another attempt cannot help
        raise JobInputError(str(exc)) from exc
    for seed in todo:
        if lost():
            raise LeaseLostError("lost the job's lease to another worker (heartbeat)")
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
        if rendered.nsfw:
            # Never passed off as a success: its row says flagged, and it is kept apart for
            # review (or not kept at all).
            log.warning("job %s seed %s: flagged by the safety checker", job.id, seed)
            drop = runtime.settings.flagged_images == "drop"
            key = "" if drop else QUARANTINE_PREFIX + key
        if key:
            runtime.storage.put(key, png, content_type="image/png")
        _record_image(session, job, seed, key, png, sha256, rendered)
        if not extend_lease(session, job, lease):
            raise LeaseLostError("lost the job's lease to another worker")


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
