"""Storing a job's rendered images: the PNG with its metadata (and its review thumbnail where
thumbnails are made at render time), the uploads, and the image rows.

:class:`ImageWriter` runs in the worker's upload pool, so the GPU renders the next batch while
this one is encoded and stored; the render loop (worker.render) then records the stored batch
with :func:`insert_images`, in the transaction that holds the job's lease. An image's object
is stored before its row is written, so a row never points to a missing object.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
import re
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pydantic
from sqlalchemy import Insert
from sqlalchemy.orm import Session

import pixelmill
from db.job_options import JobOptions
from db.models import Image, SafetyStatus
from db.ranking import ImageScore, KeeperPrediction
from db.upsert import insert_ignoring_conflicts, insert_ignoring_conflicts_stmt
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from pixelmill.thumbnails import (
    QUARANTINE_PREFIX,
    THUMBNAIL_CONTENT_TYPE,
    encode_thumbnail,
    thumbnail_key,
)
from worker import metrics
from worker.claim import ClaimedJob, JobDetails, hold_lease
from worker.errors import JobInputError, LeaseLostError

if TYPE_CHECKING:
    from worker.loading import LoadedModel
    from worker.pipeline import RenderedImage
    from worker.png import A1111Sampler
    from worker.scoring.render_time import ScoredImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What an image's metadata names besides the job's own parameters."""

    run_name: str
    item_key: str
    template: str
    variant: str

    @classmethod
    def of(cls, details: JobDetails) -> JobContext:
        return cls(details.run_name, details.item_key, details.template, details.variant)


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


@dataclass(frozen=True)
class JobInputs:
    """What a job renders from besides its prompt: its kind, its options, its staged images."""

    kind: str
    options: JobOptions
    input_image: str | None  # sha256 of the staged input image
    mask_image: str | None  # sha256 of the staged mask image (inpaint with a mask column)

    @classmethod
    def of(cls, details: JobDetails) -> JobInputs:
        """The job's inputs as claimed; options that do not validate are a JobInputError."""
        try:
            options = JobOptions.from_json(details.options)
        except pydantic.ValidationError as exc:
            raise JobInputError(f"options: {exc}") from exc
        return cls(details.kind, options, details.input_image, details.mask_image)


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
    # Its scores and keep probability (None: not scored), recorded with its row.
    scored: ScoredImage | None = None
    # The seeds of the pipeline call that rendered it, in batch order (Image.batch_seeds).
    batch_seeds: tuple[int, ...] = ()


def _safety(rendered: RenderedImage) -> SafetyStatus:
    if rendered.nsfw is None:
        return SafetyStatus.UNCHECKED
    return SafetyStatus.FLAGGED if rendered.nsfw else SafetyStatus.SAFE


class ImageWriter:
    """Encodes, stores and describes the images of one job (runs in the upload pool)."""

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        job: ClaimedJob,
        context: JobContext,
        model: LoadedModel,
        sampler: A1111Sampler,
        inputs: JobInputs,
        strength: float | None,
    ) -> None:
        from worker.identity import library_versions

        self.storage = storage
        self.settings = settings
        self.job = job
        self.context = context
        self.model = model
        self.sampler = sampler
        self.inputs = inputs
        self.strength = strength  # the effective one (the kind's default when not given)
        self.versions = library_versions()

    def store(
        self,
        rendered: RenderedImage,
        scored: ScoredImage | None = None,
        batch: Sequence[int] = (),
    ) -> StoredImage:
        """Encode and store one image; ``batch`` is the seeds rendered with it, in order."""
        from worker.png import encode_png

        safety = _safety(rendered)
        batch_seeds = tuple(batch) or (rendered.seed,)
        png = encode_png(
            rendered.image,
            parameters=self._parameters(rendered.seed),
            pixelmill={
                **self._pixelmill(rendered.seed, safety),
                **rendered.metadata,
                "batch_seeds": list(batch_seeds),
            },
        )
        sha256 = hashlib.sha256(png).hexdigest()
        key = image_key(self.job, self.context.item_key, rendered.seed, sha256)
        if safety == SafetyStatus.FLAGGED:
            # Never passed off as a success: its row says flagged, and it is kept apart for
            # review (or not kept at all).
            log.warning("job %s seed %s: flagged by the safety checker", self.job.id, rendered.seed)
            metrics.SAFETY_FLAGS.inc()
            drop = self.settings.flagged_images == "drop"
            key = "" if drop else QUARANTINE_PREFIX + key
        thumb_key = None
        if key and self.settings.thumbnails_at_render:
            thumb_key = thumbnail_key(key)
            thumbnail = encode_thumbnail(rendered.image, size=self.settings.thumbnail_size)
            # The thumbnail first: the image is what makes the seed count as stored.
            self._put(thumb_key, thumbnail, THUMBNAIL_CONTENT_TYPE)
        if key:
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
            scored=scored,
            batch_seeds=batch_seeds,
        )

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        started = time.perf_counter()
        try:
            self.storage.put(key, data, content_type=content_type)
        except Exception:
            metrics.UPLOAD_ERRORS.inc()
            raise
        metrics.UPLOAD_SECONDS.observe(time.perf_counter() - started)

    def _parameters(self, seed: int) -> str:
        from worker.identity import short_hash
        from worker.png import a1111_parameters

        job = self.job
        cfg_scale, extra = job.guidance, self._a1111_extra()
        if self.model.family is not None and self.model.family.name == "flux":
            # As Forge writes FLUX.1's: the guidance the model takes as an input is its
            # "Distilled CFG Scale", and "CFG scale" the true CFG scale (1: none ran).
            cfg_scale = self.inputs.options.true_cfg or 1.0
            extra = [("Distilled CFG Scale", str(float(job.guidance))), *extra]
        return a1111_parameters(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            steps=job.steps,
            sampler=self.sampler.name,
            schedule_type=self.sampler.schedule_type,
            cfg_scale=cfg_scale,
            seed=seed,
            width=job.width,
            height=job.height,
            model_name=job.model,
            model_hash=short_hash(self.model.sha256),
            version=f"pixelmill {pixelmill.__version__}",
            extra=extra,
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
            "family": self.model.family_metadata(),
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


def insert_images(
    session: Session,
    job: ClaimedJob,
    model: LoadedModel,
    stored: list[StoredImage],
    *,
    commit: bool = True,
) -> None:
    """Record the rows of stored images, with their scores and predictions, in one statement
    (and one per score table), and commit; a seed that already has a row keeps it (and
    whatever scores it has). With ``commit=False`` the caller commits, and then counts them
    (:func:`count_images`)."""
    from worker.identity import library_versions

    if not stored:
        return
    versions = library_versions()
    rows = [
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
            "batch_seeds": list(image.batch_seeds) or None,
            "render_seconds": image.render_seconds,
        }
        for image in stored
    ]
    # On the session's connection: one Core executemany, without the ORM's bulk-insert layer.
    connection = session.connection()
    inserted = connection.execute(_insert_images_statement(connection.dialect.name), rows).all()
    ids = {int(seed): int(image_id) for image_id, seed in inserted}
    _insert_scores(session, [(ids[s.seed], s.scored) for s in stored if s.seed in ids and s.scored])
    if commit:
        session.commit()
        count_images(stored)


@functools.cache
def _insert_images_statement(dialect: str) -> Insert:
    """The images' INSERT ... ON CONFLICT DO NOTHING RETURNING, built once per dialect: every
    job records its images with it."""
    return insert_ignoring_conflicts_stmt(dialect, Image).returning(Image.id, Image.seed)


def count_images(stored: list[StoredImage]) -> None:
    """Count recorded images by safety status (worker.metrics), once their rows committed."""
    for image in stored:
        metrics.IMAGES.labels(image.safety.value).inc()


def _insert_scores(session: Session, scored: list[tuple[int, ScoredImage]]) -> None:
    insert_ignoring_conflicts(
        session,
        ImageScore,
        [
            {
                "image_id": image_id,
                "scorer": score.scorer,
                "clip_score": score.scores.clip_score,
                "aesthetic_score": score.scores.aesthetic_score,
                "image_similarity": score.scores.image_similarity,
                "embedding": score.scores.embedding,
            }
            for image_id, score in scored
        ],
    )
    insert_ignoring_conflicts(
        session,
        KeeperPrediction,
        [
            {"image_id": image_id, "model_id": score.model_id, "probability": score.probability}
            for image_id, score in scored
            if score.model_id is not None and score.probability is not None
        ],
    )


def record_batch(
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
    insert_images(session, job, model, stored)


def record_stored(
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
            insert_images(session, job, model, stored)
        else:
            session.rollback()
    except Exception:
        log.exception("job %s: could not record %d stored images", job.id, len(stored))
