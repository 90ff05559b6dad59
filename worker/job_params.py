"""A claimed job's render parameters: its input images read from storage and prepared, its
ControlNet loaded, its adapters checked, its fast path chosen (worker.render renders them;
worker.reproduce renders one image again with them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import InputImage
from pixelmill.storage import Storage, StorageError
from worker.claim import ClaimedJob
from worker.image_writer import JobInputs
from worker.models import resolve_controlnet

if TYPE_CHECKING:
    import PIL.Image

    from worker.pipeline import RenderParams
    from worker.render import WorkerRuntime


def job_render_params(
    runtime: WorkerRuntime,
    session: Session,
    job: ClaimedJob,
    inputs: JobInputs,
    model_name: str,
) -> tuple[RenderParams, PIL.Image.Image | None]:
    """The job's render parameters: its input images read from storage, decoded, fitted and
    masked, its ControlNet loaded, its adapter files checked; and the input image as decoded
    (None for txt2img), which the scorer compares the renders with.

    Raises a BadInputError (ConditioningError, AdapterError) naming the input.
    """
    from worker.adapters import check_adapter_files
    from worker.conditioning import CONTROLNET, ConditioningError, prepare_inputs
    from worker.fast_path import job_fast_path
    from worker.loading import NULL_MODEL
    from worker.pipeline import RenderParams

    options = inputs.options
    check_adapter_files(options.loras, options.embeddings)
    image = staged_image(session, runtime.storage, inputs.input_image, "input image")
    mask = staged_image(session, runtime.storage, inputs.mask_image, "mask image")
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
    params = RenderParams(
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
        sampling=options.sampling,
        fast_path=job_fast_path(runtime.settings, model_name, options, runtime.pipelines.device),
        true_cfg=options.true_cfg,
    )
    return params, image


def staged_image(
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
