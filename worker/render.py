"""Render one job: claim it, render its seeds in batches, store the PNGs, record the images.

The GPU does not wait on I/O: while batch k+1 renders, a small thread pool encodes batch k's
PNGs and thumbnails and uploads them; the main thread then records their rows (one statement
and one commit per batch) and extends the lease; the last batch's rows are written in the
transaction that marks the job ``done`` (worker.claim.finish_job), off the render thread
(worker.tail). An image's object is stored before its row is written, so a row never points
to a missing object, and a job interrupted half-way resumes where it stopped and never
records a seed twice. The job is ``done`` only once every upload and row is durable.

Outcomes: a prompt the blocklist refuses ends ``blocked`` without rendering; a BadInputError
(the job's own inputs: bad parameters, a missing model folder, an unreadable input image)
ends ``failed`` at once; any other error (CUDA out of memory, storage down, the task's time
limit) gives the job back as ``pending`` for another attempt, or ends it ``dead`` once it has
had ``max_attempts`` (worker.errors). Images the safety checker flags are recorded as
``flagged`` and stored under ``quarantine/`` (or not at all): see worker.image_writer.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Image, JobStatus
from pixelmill.blocklist import Blocklist, BlockMatch, load_blocklist
from pixelmill.errors import BadInputError
from pixelmill.outages import RetryBackoff, infrastructure_error
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from worker import metrics
from worker.claim import (
    ClaimedJob,
    JobDetails,
    bury_exhausted,
    claim_job,
    fail_job,
    finish_job,
    read_details,
    release_job,
)
from worker.errors import JobInputError, LeaseLostError
from worker.heartbeat import Heartbeat
from worker.image_writer import (
    ImageWriter,
    JobContext,
    JobInputs,
    StoredImage,
    count_images,
    insert_images,
    record_batch,
    record_stored,
)
from worker.job_params import job_render_params
from worker.models import resolve_model
from worker.tail import JobTails

if TYPE_CHECKING:
    from worker.loading import LoadedModel, PipelineCache
    from worker.pipeline import RenderedImage, RenderParams
    from worker.png import A1111Sampler
    from worker.scoring.keepers import JobKeepers
    from worker.scoring.render_time import JobScoring
    from worker.scoring.scorer import Scorer

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
    # Scores every image as it is rendered (worker.scoring); None: nothing is scored.
    scorer: Scorer | None = None
    # Encodes and uploads images for every job of this process (upload_workers threads); one
    # pool, so a job's first batch can upload while the previous job's tail still does.
    _uploads: ThreadPoolExecutor | None = field(default=None, repr=False)
    # Each pipeline's A1111 sampler per job scheduler name: naming it meant building the
    # scheduler from its config, the largest cost of a job's preparation after the database.
    _samplers: weakref.WeakKeyDictionary[Any, dict[str | None, A1111Sampler]] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False
    )

    def sampler(self, pipe: Any, scheduler: str | None) -> A1111Sampler:
        """How A1111 names the scheduler a job asking for ``scheduler`` renders with on
        ``pipe`` (the same for every job: it derives from the model's own scheduler)."""
        from worker.pipeline import job_scheduler
        from worker.png import a1111_sampler

        known = self._samplers.setdefault(pipe, {})
        if scheduler not in known:
            known[scheduler] = a1111_sampler(job_scheduler(pipe, scheduler))
        return known[scheduler]

    def uploads(self) -> ThreadPoolExecutor:
        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(
                max_workers=self.settings.upload_workers, thread_name_prefix="upload"
            )
        return self._uploads


def _details(session: Session, job: ClaimedJob) -> JobDetails:
    """What the claim read back (one round trip), or read now for a job claimed otherwise."""
    return job.details if job.details is not None else read_details(session, job.id)


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
    # Read before the claim: a blocklist file that cannot be read leaves the job unclaimed.
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
            return _unclaimable(session, job_id, max_attempts=settings.max_attempts)
        if job.attempt > 1:
            metrics.REDELIVERIES.inc()
        match = blocklist.check(job.prompt, job.negative_prompt)
        if match is not None:
            return _block(session, job, match)

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
    _finish_in_background(runtime, job, tail, lease, heartbeat, started=started)
    return DEFERRED


def _unclaimable(session: Session, job_id: int, *, max_attempts: int) -> str:
    """``dead`` for a job out of attempts (buried now), else ``skipped``."""
    if bury_exhausted(session, job_id, max_attempts=max_attempts):
        log.warning("job %s is dead: out of attempts (%s)", job_id, max_attempts)
        return "dead"
    log.info("job %s is not claimable (done, running elsewhere or run inactive)", job_id)
    return "skipped"


def _block(session: Session, job: ClaimedJob, match: BlockMatch) -> str:
    """End a job whose prompt the blocklist refuses, without rendering it."""
    log.warning("job %s is blocked by rule %r (%s)", job.id, match.rule, match.source)
    reason = f"blocked by rule {match.rule!r} ({match.source}): matched {match.matched!r}"
    if not fail_job(session, job, reason, status=JobStatus.BLOCKED):
        return "skipped"
    return "blocked"


def _finish_in_background(
    runtime: WorkerRuntime,
    job: ClaimedJob,
    tail: _Tail,
    lease: timedelta,
    heartbeat: Heartbeat,
    *,
    started: float,
) -> None:
    """Record the job's last batch and mark it done on ``runtime.tails``."""

    def finish() -> str:
        # Counted here, not by the task's end (worker.metrics_hooks): the job ends now.
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
        finish, deadline=runtime.settings.job_time_limit_seconds, overdue=heartbeat.stop
    )


@dataclass(frozen=True)
class _Tail:
    """A rendered job's last batch, still being encoded and uploaded."""

    model: LoadedModel | None  # None: every seed already had an image, or none is rendered
    storing: list[Future[StoredImage]]
    # Seeds left unrendered: the item already had enough likely keepers (early stop).
    skipped: tuple[int, ...] = ()


def _finish_tail(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    tail: _Tail,
    lease: timedelta,
    heartbeat: Heartbeat,
) -> str:
    """Record the last batch and mark the job done in one fenced transaction (the rows and
    ``done`` are durable together, or neither is), or end it by the error."""
    try:
        try:
            stored = _stored_tail(session, job, tail, lease)
            ours, saved_per_seed = _finish_recorded(runtime, session, job, tail, stored)
        except Exception as exc:
            return _end_with_error(runtime, session, job, exc)
        if not ours:
            log.warning("job %s was taken over by another worker before it finished", job.id)
            return "skipped"
        count_images(stored)
        if tail.skipped:
            from worker.scoring.keepers import report_early_stop

            report_early_stop(job, tail.skipped, saved_per_seed)
        return "done"
    finally:
        heartbeat.stop()


def _stored_tail(
    session: Session, job: ClaimedJob, tail: _Tail, lease: timedelta
) -> list[StoredImage]:
    """The last batch, once uploaded. After a failed upload what was stored is recorded (a
    retry renders only the rest) and the upload's error raised."""
    if tail.model is None:
        return []
    try:
        return [future.result() for future in tail.storing]
    except BaseException:
        record_stored(session, job, tail.model, tail.storing, lease)
        raise


def _finish_recorded(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    tail: _Tail,
    stored: list[StoredImage],
) -> tuple[bool, float | None]:
    """Mark the job done with its last rows and skipped seeds in the same transaction: whether
    it was still ours, and (early stop) the mean seconds per image the skipped seeds saved."""
    saved_per_seed: float | None = None

    def record() -> None:
        nonlocal saved_per_seed
        if tail.model is not None:
            insert_images(session, job, tail.model, stored, commit=False)
        saved_per_seed = _record_skipped(runtime, session, job, tail.skipped)

    ours = finish_job(session, job, record=record)
    return ours, saved_per_seed


def _record_skipped(
    runtime: WorkerRuntime, session: Session, job: ClaimedJob, skipped: tuple[int, ...]
) -> float | None:
    """Write the seeds early stop left out in the transaction that finishes the job (also
    when it left none while early stop is on: a retry decides afresh); the job's mean
    seconds per image, which they would have cost."""
    if not skipped and (runtime.scorer is None or runtime.settings.early_stop_keepers is None):
        return None
    from worker.scoring.keepers import mean_render_seconds, record_skipped

    record_skipped(session, job, skipped)
    return mean_render_seconds(session, job) if skipped else None


def _end_with_error(
    runtime: WorkerRuntime, session: Session, job: ClaimedJob, exc: Exception
) -> str:
    """End a job that raised: failed (bad input), given back for a retry, or dead."""
    session.rollback()
    error = _describe(exc)
    if isinstance(exc, LeaseLostError):
        log.warning("job %s: %s", job.id, exc)
        return "skipped"
    outage = None if isinstance(exc, BadInputError) else infrastructure_error(exc)
    if isinstance(exc, BadInputError):  # the job's own inputs: another attempt cannot help
        log.error("job %s failed: %s", job.id, error)
        status, outcome = JobStatus.FAILED, "failed"
    elif outage is not None:  # not the job's fault: retried, and the attempt is not counted
        log.warning("job %s: %s; to be retried (attempt not counted)", job.id, outage)
        status, outcome = JobStatus.PENDING, "retry"
    elif job.counted_attempts >= runtime.settings.max_attempts:
        log.error("job %s failed on its last attempt (%s)", job.id, job.attempt, exc_info=exc)
        status, outcome = JobStatus.DEAD, "dead"
    else:
        log.error("job %s failed on attempt %s, to be retried", job.id, job.attempt, exc_info=exc)
        status, outcome = JobStatus.PENDING, "retry"
    if status == JobStatus.PENDING:
        delay = RetryBackoff.from_settings(runtime.settings).delay(job.attempt)
        ours = release_job(session, job, error, retry_in=delay, outage=outage is not None)
    else:
        ours = fail_job(session, job, error, status=status)
    if not ours:
        log.warning("job %s was taken over by another worker before it ended", job.id)
        return "skipped"
    return outcome


def _batches(seeds: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seeds), size):
        yield seeds[start : start + size]


@dataclass(frozen=True)
class _Prepared:
    """What a claimed job renders with: its checked inputs, its model, its image writer."""

    model_name: str
    model: LoadedModel
    params: RenderParams
    writer: ImageWriter
    item_key: str
    scoring: JobScoring | None  # None: nothing is scored


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
    details = _details(session, job)
    # The claim counted the job's images: most jobs have none, and need no query for them.
    done = (
        set(session.scalars(select(Image.seed).where(Image.job_id == job.id)))
        if details.images
        else set()
    )
    todo = [seed for seed in job.seeds if seed not in done]
    if not todo:
        return _Tail(model=None, storing=[])
    keepers = _job_keepers(runtime, session, job)
    if keepers is not None and keepers.enough(session):
        # Other jobs of the item (other templates, earlier batches) found enough already.
        return _Tail(model=None, storing=[], skipped=tuple(todo))
    prepared = _prepare(runtime, session, job, keepers)
    # End the read transaction: nothing stays "idle in transaction" while the GPU renders.
    session.commit()
    return _render_batches(runtime, session, job, lease, todo, prepared, lost=lost)


def _job_keepers(runtime: WorkerRuntime, session: Session, job: ClaimedJob) -> JobKeepers | None:
    """The job's keeper model and early stop (None: this worker scores nothing)."""
    if runtime.scorer is None:
        return None
    from worker.scoring.keepers import job_keepers

    settings = runtime.settings
    return job_keepers(
        session,
        job,
        runtime.scorer.identity,
        stop_at=settings.early_stop_keepers,
        probability=settings.early_stop_probability,
    )


def _prepare(
    runtime: WorkerRuntime, session: Session, job: ClaimedJob, keepers: JobKeepers | None
) -> _Prepared:
    """The job's inputs checked, then its model loaded. Every problem with the job's own
    inputs is a BadInputError; one that names an input of its item names the item too."""
    from worker.conditioning import check_controlnet
    from worker.pipeline import check_inputs

    details = _details(session, job)
    context = JobContext.of(details)
    inputs = JobInputs.of(details)
    model_name = resolve_model(job.model, runtime.settings)
    # Inputs first (images, adapter files, ControlNet), then the model: a bad input fails
    # the job without loading a model for nothing.
    try:
        params, photo = job_render_params(runtime, session, job, inputs, model_name)
    except BadInputError as exc:
        raise _item_error(context.item_key, exc) from exc
    check_inputs(params)
    model = runtime.pipelines.load(model_name)
    if params.controlnet is not None:
        try:
            check_controlnet(model.pipe, params.controlnet)
        except BadInputError as exc:
            raise _item_error(context.item_key, exc) from exc
    writer = ImageWriter(
        runtime.storage,
        runtime.settings,
        job,
        context,
        model,
        runtime.sampler(model.pipe, job.scheduler),
        inputs,
        params.strength,
    )
    scoring = None
    if runtime.scorer is not None and keepers is not None:
        from worker.scoring.render_time import JobScoring

        scoring = JobScoring(runtime.scorer, job.prompt, keepers, photo=photo)
    return _Prepared(model_name, model, params, writer, context.item_key, scoring)


def _render_batches(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    lease: timedelta,
    todo: list[int],
    prepared: _Prepared,
    *,
    lost: Callable[[], bool],
) -> _Tail:
    """Render ``todo`` in batches, each stored while the next renders."""
    from worker.adapters import AdapterLeakError
    from worker.batch_probe import batch_size
    from worker.pipeline import render_batch
    from worker.scoring.render_time import score_batch, without_pixels

    model = prepared.model
    pool = runtime.uploads()
    # At most two batches in flight: the one rendering and the one being stored.
    storing: list[Future[StoredImage]] = []
    rendered_count = 0
    try:
        for seeds in _batches(todo, batch_size(model.pipe, prepared.params, runtime.settings)):
            if lost():
                raise LeaseLostError("lost the job's lease to another worker (heartbeat)")
            started = time.perf_counter()
            try:
                rendered = render_batch(model.pipe, prepared.params, seeds)
            except BadInputError as exc:  # an adapter file that does not load onto this model
                raise _item_error(prepared.item_key, exc) from exc
            except AdapterLeakError:
                # Never render another job with this pipeline's leftovers.
                runtime.pipelines.discard(prepared.model_name)
                raise
            _observe_batch(time.perf_counter() - started, rendered)
            scored = score_batch(prepared.scoring, rendered)
            record_batch(session, job, model, storing, lease)
            storing = [
                pool.submit(prepared.writer.store, without_pixels(image), score, seeds)
                for image, score in zip(rendered, scored, strict=True)
            ]
            rendered_count += len(seeds)
            if prepared.scoring is not None and prepared.scoring.enough(session, scored):
                break
    except BaseException:
        # Keep what is already stored (a retry then renders only the rest) unless the job is
        # no longer ours; a failure here must not hide the original error.
        record_stored(session, job, model, storing, lease)
        raise
    return _Tail(model=model, storing=storing, skipped=tuple(todo[rendered_count:]))


def _observe_batch(seconds: float, rendered: list[RenderedImage]) -> None:
    metrics.BATCH_RENDER_SECONDS.observe(seconds)
    for image in rendered:
        metrics.RENDER_SECONDS.observe(image.seconds)
