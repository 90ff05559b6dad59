"""Render one job: claim it, render its seeds in batches, store the PNGs, record the images.

The GPU does not wait on I/O: while batch k+1 renders, a small thread pool encodes batch k's
PNGs and thumbnails and uploads them; the main thread then records their rows (one commit per
batch) and extends the lease. An image's object is stored before its row is written, so a row
never points to a missing object, and a job interrupted half-way resumes where it stopped and
never records a seed twice. The job is ``done`` only once every upload and row is durable.

Outcomes: a prompt the blocklist refuses ends ``blocked`` without rendering; a deterministic
input error (bad parameters, a missing model folder) ends ``failed`` at once; any other error
(CUDA out of memory, storage down, the task's time limit) gives the job back as ``pending``
for another attempt, or ends it ``dead`` once it has had ``max_attempts``. Images the safety
checker flags are recorded as ``flagged`` and stored under ``quarantine/`` (or not at all).
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pydantic
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import pixelmill
from db.job_options import JobOptions
from db.models import CatalogueItem, Image, InputImage, Job, JobStatus, Run, SafetyStatus
from db.upsert import insert_ignoring_conflicts
from monitoring import metrics
from pixelmill.blocklist import Blocklist, load_blocklist
from pixelmill.errors import BadInputError, PixelmillError
from pixelmill.settings import Settings
from pixelmill.storage import Storage, StorageError
from worker.claim import (
    ClaimedJob,
    bury_exhausted,
    claim_job,
    fail_job,
    finish_job,
    hold_lease,
    release_job,
)
from worker.heartbeat import Heartbeat
from worker.models import resolve_controlnet, resolve_model
from worker.tail import JobTails

if TYPE_CHECKING:
    import PIL.Image

    from worker.pipeline import LoadedModel, PipelineCache, RenderedImage, RenderParams

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
    # Jobs' tails finishing in the background (render_job(defer_tail=True)).
    tails: JobTails = field(default_factory=JobTails)
    # Encodes and uploads images for every job of this process (upload_workers threads); one
    # pool, so a job's first batch can upload while the previous job's tail still does.
    _uploads: ThreadPoolExecutor | None = field(default=None, repr=False)

    def uploads(self) -> ThreadPoolExecutor:
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(
                max_workers=self.settings.upload_workers, thread_name_prefix="upload"
            )
        return self._uploads


QUARANTINE_PREFIX = "quarantine/"


class JobInputError(BadInputError):
    """A deterministic problem with the job itself (its parameters, its model): another
    attempt would fail the same way. The original error is the ``__cause__``."""


class LeaseLostError(PixelmillError):
    pass


@dataclass(frozen=True)
class JobContext:
    """What an image's metadata names besides the job's own parameters."""

    run_name: str
    item_key: str
    template: str
    variant: str


def _job_context(session: Session, job: ClaimedJob) -> JobContext:
    row = session.execute(
        select(Run.name, CatalogueItem.external_key, Job.template, Job.variant)
        .join(Job, Job.run_id == Run.id)
        .join(CatalogueItem, CatalogueItem.id == Job.item_id)
        .where(Job.id == job.id)
    ).one()
    return JobContext(run_name=row[0], item_key=row[1], template=row[2], variant=row[3])


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key_part(text: str, *, limit: int = 80) -> str:
    """``text`` as one storage path segment: letters, digits, ``.``, ``_`` and ``-`` only, no
    leading dots (so never ``.`` or ``..``), at most ``limit`` characters, never empty."""
    cleaned = _UNSAFE_KEY_CHARS.sub("_", text).lstrip(".")[:limit]
    return cleaned or "_"


def image_key(job: ClaimedJob, item_key: str, seed: int, sha256: str) -> str:
    # Nothing from the prompt; the item key only as a sanitised segment (the job id already
    # makes the key unique). The content hash is part of the key: if a worker that lost its
    # lease renders the same seed as its successor (GPU renders need not be bit-exact), each
    # uploads its own object and the one recorded row always points at the bytes its sha256
    # describes. A retried upload of the same bytes overwrites the same key.
    return f"runs/{job.run_id}/{safe_key_part(item_key)}/{job.id}/{seed}-{sha256[:16]}.png"


def thumbnail_key(key: str) -> str:
    """The thumbnail beside an image: same path under ``thumbs/``, as JPEG."""
    prefix = QUARANTINE_PREFIX if key.startswith(QUARANTINE_PREFIX) else ""
    return f"{prefix}thumbs/{key.removeprefix(prefix).removesuffix('.png')}.jpg"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, JobInputError) and exc.__cause__ is not None:
        # The cause's kind, the JobInputError's message (which may add the item key).
        return f"{type(exc.__cause__).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _item_error(item_key: str, exc: Exception) -> JobInputError:
    """A deterministic problem with one item's inputs, naming the item."""
    error = JobInputError(f"item {item_key!r}: {exc}")
    error.__cause__ = exc
    return error


@dataclass(frozen=True)
class JobInputs:
    """What a job renders from besides its prompt (the jobs columns of issue 7)."""

    kind: str
    options: JobOptions
    input_image: str | None  # sha256 of the staged input image
    mask_image: str | None  # sha256 of the staged mask image (inpaint with a mask column)


def _job_inputs(session: Session, job: ClaimedJob) -> JobInputs:
    row = session.execute(
        select(Job.kind, Job.options, Job.input_image, Job.mask_image).where(Job.id == job.id)
    ).one()
    try:
        options = JobOptions.from_json(row.options)
    except pydantic.ValidationError as exc:
        raise JobInputError(f"options: {exc}") from exc
    return JobInputs(
        kind=row.kind, options=options, input_image=row.input_image, mask_image=row.mask_image
    )


def _staged_image(
    session: Session, storage: Storage, sha256: str | None, what: str
) -> PIL.Image.Image | None:
    """Decode a staged input image, read from storage by its input_images row."""
    from worker.conditioning import ConditioningError, decode_image

    if sha256 is None:
        return None
    key = session.scalar(select(InputImage.storage_key).where(InputImage.sha256 == sha256))
    if key is None:
        raise ConditioningError(f"{what} {sha256}: no such staged image")
    try:
        data = storage.get(key)
    except StorageError as exc:  # no such object: the staged image is gone
        raise ConditioningError(f"{what} {sha256}: {exc}") from exc
    return decode_image(data, what=f"{what} {key}")


# render_job's answer when the job's tail finishes in the background (defer_tail=True).
DEFERRED = "deferred"


def render_job(runtime: WorkerRuntime, job_id: int, *, defer_tail: bool = False) -> str:
    """Returns what happened: ``done``; ``skipped`` (not claimable, or taken over by another
    worker); ``blocked``; ``failed`` (bad input); ``retry`` (given back for another attempt);
    ``dead`` (out of attempts).

    With ``defer_tail`` (the Celery task), a job whose seeds have all rendered returns
    ``deferred`` at once and its last uploads, rows and ``done`` finish on ``runtime.tails``
    while the next job renders (see worker.tail)."""
    started = time.monotonic()
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

        if job.attempt > 1:
            metrics.REDELIVERIES.inc()
        match = blocklist.check(job.prompt, job.negative_prompt)
        if match is not None:
            log.warning("job %s is blocked by rule %r (%s)", job_id, match.rule, match.source)
            reason = f"blocked by rule {match.rule!r} ({match.source}): matched {match.matched!r}"
            if not fail_job(session, job, reason, status=JobStatus.BLOCKED):
                return "skipped"
            return "blocked"

        heartbeat = Heartbeat(runtime.sessions, job, lease)
        heartbeat.start()
        try:
            tail = _render_claimed(runtime, session, job, lease, lost=heartbeat.lost.is_set)
        except BaseException as exc:
            heartbeat.stop()
            if not isinstance(exc, Exception):
                raise
            return _end_with_error(runtime, session, job, exc)
        if not defer_tail:
            return _finish_tail(runtime, session, job, tail, lease, heartbeat)

    def finish_in_background() -> str:
        # Counted here, not by the task's end (monitoring.worker_hooks): the job ends now.
        try:
            with runtime.sessions() as tail_session:
                outcome = _finish_tail(runtime, tail_session, job, tail, lease, heartbeat)
        except BaseException:
            metrics.JOBS_FINISHED.labels("error").inc()
            raise
        finally:
            metrics.JOB_SECONDS.observe(time.monotonic() - started)
        metrics.JOBS_FINISHED.labels(outcome).inc()
        return outcome

    # A tail that outlives a whole job's time limit is hung: stop its heartbeat so the lease
    # expires and the job is re-queued (its late writes are fenced off by the lease).
    runtime.tails.defer(
        finish_in_background, deadline=settings.job_time_limit_seconds, overdue=heartbeat.stop
    )
    return DEFERRED


@dataclass(frozen=True)
class _Tail:
    """A rendered job's last batch, still being encoded and uploaded."""

    model: LoadedModel | None  # None: every seed already had an image
    storing: list[Future[StoredImage]]


def _finish_tail(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    tail: _Tail,
    lease: timedelta,
    heartbeat: Heartbeat,
) -> str:
    """Record the last batch, then mark the job done (or end it by the error)."""
    try:
        try:
            if tail.model is not None:
                try:
                    _record(session, job, tail.model, tail.storing, lease)
                except BaseException:
                    _record_finished(session, job, tail.model, tail.storing, lease)
                    raise
        except Exception as exc:
            return _end_with_error(runtime, session, job, exc)
        if not finish_job(session, job):
            log.warning("job %s was taken over by another worker before it finished", job.id)
            return "skipped"
        return "done"
    finally:
        heartbeat.stop()


def _end_with_error(
    runtime: WorkerRuntime, session: Session, job: ClaimedJob, exc: Exception
) -> str:
    """End a job that raised: failed (bad input), given back for a retry, or dead."""
    session.rollback()
    error = _describe(exc)
    if isinstance(exc, LeaseLostError):
        log.warning("job %s: %s", job.id, exc)
        return "skipped"
    if isinstance(exc, JobInputError):
        log.error("job %s failed: %s", job.id, error)
        status, outcome = JobStatus.FAILED, "failed"
    elif job.attempt >= runtime.settings.max_attempts:
        log.error("job %s failed on its last attempt (%s)", job.id, job.attempt, exc_info=exc)
        status, outcome = JobStatus.DEAD, "dead"
    else:
        log.error("job %s failed on attempt %s, to be retried", job.id, job.attempt, exc_info=exc)
        status, outcome = JobStatus.PENDING, "retry"
    if status == JobStatus.PENDING:
        ours = release_job(session, job, error)
    else:
        ours = fail_job(session, job, error, status=status)
    if not ours:
        log.warning("job %s was taken over by another worker before it ended", job.id)
        return "skipped"
    return outcome


@dataclass(frozen=True)
class StoredImage:
    """One seed's image, stored (unless dropped as flagged) and ready for its row."""

    seed: int
    key: str  # "" when a flagged image was dropped
    thumbnail_key: str | None
    sha256: str
    bytes: int
    width: int
    height: int
    safety: SafetyStatus
    render_seconds: float


def _safety(rendered: RenderedImage) -> SafetyStatus:
    if rendered.nsfw is None:
        return SafetyStatus.UNCHECKED
    return SafetyStatus.FLAGGED if rendered.nsfw else SafetyStatus.SAFE


def _batches(seeds: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seeds), size):
        yield seeds[start : start + size]


class _ImageWriter:
    """Encodes, stores and describes the images of one job (runs in the upload pool)."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        job: ClaimedJob,
        context: JobContext,
        model: LoadedModel,
        sampler: str,
        inputs: JobInputs,
        strength: float | None,
    ) -> None:
        from worker.identity import library_versions

        self.runtime = runtime
        self.job = job
        self.context = context
        self.model = model
        self.sampler = sampler
        self.inputs = inputs
        self.strength = strength  # the effective one (the kind's default when not given)
        self.versions = library_versions()

    def store(self, rendered: RenderedImage) -> StoredImage:
        from worker.png import THUMBNAIL_CONTENT_TYPE, encode_png, encode_thumbnail

        safety = _safety(rendered)
        png = encode_png(
            rendered.image,
            parameters=self._parameters(rendered.seed),
            pixelmill=self._pixelmill(rendered.seed, safety),
        )
        sha256 = hashlib.sha256(png).hexdigest()
        key = image_key(self.job, self.context.item_key, rendered.seed, sha256)
        if safety == SafetyStatus.FLAGGED:
            # Never passed off as a success: its row says flagged, and it is kept apart for
            # review (or not kept at all).
            log.warning("job %s seed %s: flagged by the safety checker", self.job.id, rendered.seed)
            metrics.SAFETY_FLAGS.inc()
            drop = self.runtime.settings.flagged_images == "drop"
            key = "" if drop else QUARANTINE_PREFIX + key
        thumb_key = None
        if key:
            thumb_key = thumbnail_key(key)
            thumbnail = encode_thumbnail(rendered.image, size=self.runtime.settings.thumbnail_size)
            # The thumbnail first: the image is what makes the seed count as stored.
            self._put(thumb_key, thumbnail, THUMBNAIL_CONTENT_TYPE)
            self._put(key, png, "image/png")
        return StoredImage(
            seed=rendered.seed,
            key=key,
            thumbnail_key=thumb_key,
            sha256=sha256,
            bytes=len(png),
            width=rendered.image.width,
            height=rendered.image.height,
            safety=safety,
            render_seconds=rendered.seconds,
        )

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        started = time.perf_counter()
        try:
            self.runtime.storage.put(key, data, content_type=content_type)
        except Exception:
            metrics.UPLOAD_ERRORS.inc()
            raise
        metrics.UPLOAD_SECONDS.observe(time.perf_counter() - started)

    def _parameters(self, seed: int) -> str:
        from worker.identity import short_hash
        from worker.png import a1111_parameters

        job = self.job
        return a1111_parameters(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            steps=job.steps,
            sampler=self.sampler,
            cfg_scale=job.guidance,
            seed=seed,
            width=job.width,
            height=job.height,
            model_name=job.model,
            model_hash=short_hash(self.model.sha256),
            version=f"pixelmill {pixelmill.__version__}",
            extra=self._a1111_extra(),
        )

    def _a1111_extra(self) -> list[tuple[str, str]]:
        """The A1111 settings for the kind and adapters (civitai reads the hashes)."""
        options = self.inputs.options
        extra: list[tuple[str, str]] = []
        if self.strength is not None:
            extra.append(("Denoising strength", str(self.strength)))
        if options.controlnet is not None:
            spec = options.controlnet
            module = "canny" if spec.conditioning == "canny" else "none"
            extra.append(
                ("ControlNet 0", f"Module: {module}, Model: {spec.model}, Weight: {spec.scale}")
            )
        if options.loras:
            hashes = ", ".join(
                f"{pathlib.Path(lora.path).stem}: {lora.sha256[:12]}" for lora in options.loras
            )
            extra.append(("Lora hashes", hashes))
        if options.embeddings:
            hashes = ", ".join(f"{e.token}: {e.sha256[:12]}" for e in options.embeddings)
            extra.append(("TI hashes", hashes))
        return extra

    def _pixelmill(self, seed: int, safety: SafetyStatus) -> dict[str, Any]:
        job, context = self.job, self.context
        return {
            "job_id": job.id,
            "run_id": job.run_id,
            "run": context.run_name,
            "item_key": context.item_key,
            "template": context.template,
            "variant": context.variant,
            "seed": seed,
            "model": job.model,
            "model_sha256": self.model.sha256,
            "scheduler": job.scheduler,
            "safety": {"status": safety.value, "score": None},
            "versions": self.versions,
            **self._kind_metadata(),
        }

    def _kind_metadata(self) -> dict[str, Any]:
        """The job's kind and what it rendered from; only the keys that apply."""
        inputs, options = self.inputs, self.inputs.options
        values: dict[str, Any] = {"kind": inputs.kind}
        if inputs.input_image is not None:
            values["input_image"] = inputs.input_image
        if inputs.mask_image is not None:
            values["mask_image"] = inputs.mask_image
        if self.strength is not None:
            values["strength"] = self.strength
        if options.mask is not None:
            values["mask"] = options.mask.model_dump(mode="json", exclude_none=True)
        if options.controlnet is not None:
            values["controlnet"] = options.controlnet.model_dump(mode="json")
        if options.loras:
            values["loras"] = [lora.model_dump(mode="json") for lora in options.loras]
        if options.embeddings:
            values["embeddings"] = [e.model_dump(mode="json") for e in options.embeddings]
        return values


def _render_claimed(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    lease: timedelta,
    *,
    lost: Callable[[], bool] = lambda: False,
) -> _Tail:
    """Render the seeds that have no image yet; every batch but the last is recorded here,
    the last one (still uploading) is returned for :func:`_finish_tail`."""
    from worker.adapters import AdapterError, AdapterLeakError
    from worker.conditioning import ConditioningError
    from worker.pipeline import check_inputs, render_batch, scheduler_label

    done = set(session.scalars(select(Image.seed).where(Image.job_id == job.id)))
    todo = [seed for seed in job.seeds if seed not in done]
    if not todo:
        return _Tail(model=None, storing=[])
    context = _job_context(session, job)
    inputs = _job_inputs(session, job)
    model_name = resolve_model(job.model, runtime.settings)
    # Inputs first (images, adapter files, ControlNet), then the model: a bad input fails
    # the job without loading a model for nothing.
    try:
        params = _render_params(runtime, session, job, inputs, model_name)
        check_inputs(params)
    except (ConditioningError, AdapterError) as exc:
        raise _item_error(context.item_key, exc) from exc
    except ValueError as exc:
        raise JobInputError(str(exc)) from exc
    try:
        model = runtime.pipelines.load(model_name)
    except (FileNotFoundError, ValueError) as exc:  # no such model: another attempt cannot help
        raise JobInputError(str(exc)) from exc
    if params.controlnet is not None:
        from worker.conditioning import check_controlnet

        try:
            check_controlnet(model.pipe, params.controlnet)
        except ConditioningError as exc:
            raise _item_error(context.item_key, exc) from exc
    writer = _ImageWriter(
        runtime,
        job,
        context,
        model,
        scheduler_label(job.scheduler, pipe=model.pipe),
        inputs,
        params.strength,
    )
    # End the read transaction: nothing stays "idle in transaction" while the GPU renders.
    session.commit()
    pool = runtime.uploads()
    # At most two batches in flight: the one rendering and the one being stored.
    storing: list[Future[StoredImage]] = []
    try:
        for seeds in _batches(todo, runtime.settings.render_batch_size):
            if lost():
                raise LeaseLostError("lost the job's lease to another worker (heartbeat)")
            started = time.perf_counter()
            try:
                rendered = render_batch(model.pipe, params, seeds)
            except AdapterError as exc:  # a file that does not load onto this model
                raise _item_error(context.item_key, exc) from exc
            except AdapterLeakError:
                # Never render another job with this pipeline's leftovers.
                runtime.pipelines.discard(model_name)
                raise
            _observe_batch(time.perf_counter() - started, rendered)
            _record(session, job, model, storing, lease)
            storing = [pool.submit(writer.store, image) for image in rendered]
    except BaseException:
        # Keep what is already stored (a retry then renders only the rest) unless the job is
        # no longer ours; a failure here must not hide the original error.
        _record_finished(session, job, model, storing, lease)
        raise
    return _Tail(model=model, storing=storing)


def _render_params(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    inputs: JobInputs,
    model_name: str,
) -> RenderParams:
    """The job's render parameters: its input images read from storage, decoded, fitted and
    masked, its ControlNet loaded, its adapter files checked.

    Raises ConditioningError or AdapterError naming the input, ValueError for the rest.
    """
    from worker.adapters import check_adapter_files
    from worker.conditioning import CONTROLNET, ConditioningError, prepare_inputs
    from worker.pipeline import NULL_MODEL, RenderParams

    options = inputs.options
    check_adapter_files(options.loras, options.embeddings)
    image = _staged_image(session, runtime.storage, inputs.input_image, "input image")
    mask = _staged_image(session, runtime.storage, inputs.mask_image, "mask image")
    prepared = prepare_inputs(
        inputs.kind, options, image=image, mask=mask, width=job.width, height=job.height
    )
    controlnet = None
    # The null model renders flat images: it needs no ControlNet weights.
    if options.controlnet is not None and inputs.kind == CONTROLNET and model_name != NULL_MODEL:
        try:
            controlnet = runtime.pipelines.controlnet(
                resolve_controlnet(options.controlnet.model, runtime.settings)
            )
        except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
            raise ConditioningError(
                f"controlnet: {options.controlnet.model}: cannot be loaded ({exc})"
            ) from exc
    return RenderParams(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        steps=job.steps,
        guidance=job.guidance,
        width=job.width,
        height=job.height,
        scheduler=job.scheduler,
        kind=inputs.kind,
        init_image=prepared.init_image,
        mask_image=prepared.mask_image,
        overlay=prepared.overlay,
        control_image=prepared.control_image,
        strength=prepared.strength,
        controlnet=controlnet,
        controlnet_scale=options.controlnet.scale if options.controlnet is not None else 1.0,
        loras=options.loras,
        embeddings=options.embeddings,
    )


def _observe_batch(seconds: float, rendered: list[RenderedImage]) -> None:
    metrics.BATCH_RENDER_SECONDS.observe(seconds)
    for image in rendered:
        metrics.RENDER_SECONDS.observe(image.seconds)


def _record(
    session: Session,
    job: ClaimedJob,
    model: LoadedModel,
    storing: list[Future[StoredImage]],
    lease: timedelta,
) -> None:
    """Wait for a batch's uploads, then record their rows and extend the lease in one fenced
    transaction: a worker that lost the job records nothing more."""
    if not storing:
        return
    stored = [future.result() for future in storing]  # re-raises an upload's error
    if not hold_lease(session, job, lease):
        session.rollback()
        raise LeaseLostError("lost the job's lease to another worker")
    _insert_images(session, job, model, stored)


def _record_finished(
    session: Session,
    job: ClaimedJob,
    model: LoadedModel,
    storing: list[Future[StoredImage]],
    lease: timedelta,
) -> None:
    """After an error: record what was stored anyway (a retry renders only the rest)."""
    stored = []
    for future in storing:
        try:
            stored.append(future.result())
        except Exception:
            metrics.IMAGES.labels("failed").inc()
    if not stored:
        return
    try:
        session.rollback()
        if hold_lease(session, job, lease):
            _insert_images(session, job, model, stored)
        else:
            session.rollback()
    except Exception:
        log.exception("job %s: could not record %d stored images", job.id, len(stored))


def _insert_images(
    session: Session, job: ClaimedJob, model: LoadedModel, stored: list[StoredImage]
) -> None:
    from worker.identity import library_versions

    if not stored:
        return
    versions = library_versions()
    insert_ignoring_conflicts(
        session,
        Image,
        [
            {
                "job_id": job.id,
                "seed": image.seed,
                "storage_key": image.key,
                "thumbnail_key": image.thumbnail_key,
                "sha256": image.sha256,
                "width": image.width,
                "height": image.height,
                "bytes": image.bytes,
                "safety": image.safety.value,
                "model_sha256": model.sha256,
                "versions": versions,
                "render_seconds": image.render_seconds,
            }
            for image in stored
        ],
    )
    session.commit()
    for image in stored:
        metrics.IMAGES.labels(image.safety.value).inc()
