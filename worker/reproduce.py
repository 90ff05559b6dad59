"""Re-render one stored image from its record and compare the pixels.

An image's record is its job (prompts, model, scheduler, steps, guidance, size, kind and
options, input images), its seed, the batch it was rendered in, the model's sha256 and the
library versions; the stored PNG adds how the fast path ran. Rendering the same seeds in the
same batch, with the same fast path, on the same kind of device and library versions, gives
the same pixels: PyTorch's CPU kernels are deterministic for a fixed batch, and each seed has
its own generator. A lone render of a seed that was rendered in a batch of four differs from
it by rounding (batched matmuls and convolutions sum in another order), which is why the
batch is recorded and rendered again as a whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Image, Job
from pixelmill.errors import BadInputError
from worker.claim import ClaimedJob, read_details
from worker.image_writer import JobInputs

if TYPE_CHECKING:
    from worker.fast_path import FastPath
    from worker.render import WorkerRuntime


class ImageNotFoundError(BadInputError):
    """No image has the id or storage key asked for, or it was never stored."""


@dataclass(frozen=True)
class Reproduction:
    """What re-rendering an image gave, against the stored PNG."""

    image_id: int
    storage_key: str
    seed: int
    batch_seeds: tuple[int, ...]
    max_difference: int  # largest difference of one value, in 8-bit levels
    differing_values: int  # values (pixel channels) that differ at all
    total_values: int
    # What differs between the record and this machine (model weights, library versions,
    # batch not recorded): each makes a difference explainable rather than a defect.
    changes: tuple[str, ...] = ()

    @property
    def identical(self) -> bool:
        return self.differing_values == 0


def find_image(session: Session, reference: str) -> Image:
    """The image whose id (digits) or storage key is ``reference``."""
    text = reference.strip()
    image = session.get(Image, int(text)) if text.isdigit() else None
    if image is None:
        image = session.scalar(select(Image).where(Image.storage_key == text))
    if image is None:
        raise ImageNotFoundError(f"image {reference!r}: no image has this id or storage key")
    if not image.storage_key:
        raise ImageNotFoundError(
            f"image {image.id}: flagged by the safety checker and dropped, nothing to compare"
        )
    return image


def claimed_view(job: Job) -> ClaimedJob:
    """The job as the render path reads it, without claiming it (nothing is written)."""
    return ClaimedJob(
        id=job.id,
        run_id=job.run_id,
        attempt=job.attempts,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        model=job.model,
        scheduler=job.scheduler,
        steps=job.steps,
        guidance=job.guidance,
        width=job.width,
        height=job.height,
        seeds=list(job.seeds),
    )


def recorded_fast_path(record: dict[str, Any] | None, current: FastPath) -> FastPath:
    """The fast path the stored PNG says its render ran with (``current`` where the PNG
    predates the record), keeping this worker's compile cache folder."""
    fast = (record or {}).get("fast_path")
    if not isinstance(fast, dict):
        return current
    compile_mode = fast.get("compile", "off")
    return dataclasses.replace(
        current,
        channels_last=bool(fast.get("channels_last", False)),
        fuse_qkv=bool(fast.get("fuse_qkv", False)),
        compile=None if compile_mode in (None, "off") else str(compile_mode),
        compile_vae=fast.get("compile_vae", "off") not in (None, "off"),
        fp8=bool(fast.get("fp8", False)),
        deepcache_interval=fast.get("deepcache_interval"),
    )


def reproduce_image(runtime: WorkerRuntime, session: Session, image: Image) -> Reproduction:
    """Render ``image``'s batch again as the worker rendered it and compare with the PNG.

    Raises a BadInputError when the job's inputs or model can no longer be loaded (a
    missing model folder, a staged photo gone from storage).
    """
    from worker.identity import library_versions
    from worker.job_params import job_render_params
    from worker.models import resolve_model
    from worker.pipeline import render_batch
    from worker.png import read_pixelmill

    job = session.get(Job, image.job_id)
    assert job is not None  # images.job_id is a foreign key
    claimed = claimed_view(job)
    stored = runtime.storage.get(image.storage_key)
    record = read_pixelmill(stored)
    model_name = resolve_model(job.model, runtime.settings)
    params, _photo = job_render_params(
        runtime, session, claimed, JobInputs.of(read_details(session, job.id)), model_name
    )
    if params.fast_path is not None:
        params = dataclasses.replace(params, fast_path=recorded_fast_path(record, params.fast_path))
    model = runtime.pipelines.load(model_name)
    batch = tuple(image.batch_seeds or (image.seed,))
    rendered = render_batch(model.pipe, params, list(batch))
    again = next(item for item in rendered if item.seed == image.seed)
    changes = _changes(image, model.sha256, library_versions())
    return _compare(image, batch, stored, again.image, changes)


def _changes(image: Image, model_sha256: str | None, versions: dict[str, str]) -> tuple[str, ...]:
    changes = []
    if image.batch_seeds is None:
        changes.append("its batch was not recorded: rendered alone")
    if image.model_sha256 and model_sha256 and image.model_sha256 != model_sha256:
        changes.append(f"model weights changed: {image.model_sha256[:12]} -> {model_sha256[:12]}")
    recorded = image.versions or {}
    for name in sorted(set(recorded) | set(versions)):
        if recorded.get(name) != versions.get(name):
            was, now = recorded.get(name, "none"), versions.get(name, "none")
            changes.append(f"{name} {was} -> {now}")
    return tuple(changes)


def _compare(
    image: Image,
    batch: tuple[int, ...],
    stored_png: bytes,
    rendered: PIL.Image.Image,
    changes: tuple[str, ...],
) -> Reproduction:
    import io

    with PIL.Image.open(io.BytesIO(stored_png)) as png:
        before = np.asarray(png.convert("RGB"), dtype=np.int16)
    after = np.asarray(rendered.convert("RGB"), dtype=np.int16)
    if before.shape != after.shape:
        raise BadInputError(
            f"image {image.id}: stored {before.shape[1]}x{before.shape[0]}, re-rendered "
            f"{after.shape[1]}x{after.shape[0]}: the job's size no longer matches its image"
        )
    difference = np.abs(before - after)
    return Reproduction(
        image_id=image.id,
        storage_key=image.storage_key,
        seed=image.seed,
        batch_seeds=batch,
        max_difference=int(difference.max()),
        differing_values=int(np.count_nonzero(difference)),
        total_values=int(difference.size),
        changes=changes,
    )
