"""Job kinds beyond text-to-image: their inputs (fitted image, mask, control image) and their
pipelines, made from the cached base pipeline without loading any weights again.

Conventions (db/job_options.py): the input image is fitted to the job's size (centre crop to
the aspect ratio, then a LANCZOS resize); a mask is white where pixels are generated and black
where they are kept. After an inpaint render, :func:`keep_masked` pastes the fitted input back
where the mask is black, so the kept pixels are exactly the product's, not a VAE round trip
of them. With an alpha mask the paste follows the alpha channel itself (the fitted cut-out is
alpha-composited over the result): fully opaque pixels are the product's exactly, soft edges
blend the product over the generated background as the cut-out's alpha says they should,
instead of a hard edge with a fringe of the flattened background.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from db.job_options import ControlNetSpec, JobOptions, MaskSpec
from pixelmill.errors import BadInputError

TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
CONTROLNET = "controlnet"
KINDS = (TXT2IMG, IMG2IMG, INPAINT, CONTROLNET)
# The kinds that start from the job's input image.
IMAGE_KINDS = (IMG2IMG, INPAINT, CONTROLNET)

# diffusers' own defaults when a template gives no strength.
DEFAULT_STRENGTH = {IMG2IMG: 0.8, INPAINT: 1.0}

# Transparent parts of an RGBA product photo become white: catalogue cut-outs are shot on
# white, and the generated part of an inpaint job does not depend on it anyway.
BACKGROUND = (255, 255, 255)
# Mask values: generated / kept.
GENERATE = 255
KEEP = 0


class ConditioningError(BadInputError):
    """A job's input image, mask or kind options cannot be used (a message saying which)."""


@dataclasses.dataclass(frozen=True)
class PreparedInputs:
    """A job's images at the job's size, ready for :class:`worker.pipeline.RenderParams`."""

    init_image: PIL.Image.Image | None = None  # img2img, inpaint: RGB
    mask_image: PIL.Image.Image | None = None  # inpaint: L, 255 generate / 0 keep
    # inpaint: the RGBA image pasted over the result (see keep_masked).
    overlay: PIL.Image.Image | None = None
    control_image: PIL.Image.Image | None = None  # controlnet: RGB
    strength: float | None = None  # img2img, inpaint: the effective value


def decode_image(data: bytes, *, what: str) -> PIL.Image.Image:
    """Decode image bytes completely (a truncated file fails here, not mid-render), turned
    upright by their EXIF orientation as every image viewer shows them (a phone's photo is
    often stored sideways with an orientation tag); the producer records those dimensions."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        upright = PIL.ImageOps.exif_transpose(image)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise ConditioningError(f"{what}: not a readable image ({exc})") from exc
    return upright


def has_alpha(image: PIL.Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def fit_image(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Centre-crop ``image`` to the aspect ratio of width x height, then resize (LANCZOS)."""
    return PIL.ImageOps.fit(
        image, (width, height), method=PIL.Image.Resampling.LANCZOS, centering=(0.5, 0.5)
    )


def _rgba(image: PIL.Image.Image) -> PIL.Image.Image:
    return image if image.mode == "RGBA" else image.convert("RGBA")


def fitted_rgb(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """The input image as the pipeline sees it: fitted, RGB, transparency on white."""
    if has_alpha(image):
        fitted = fit_image(_rgba(image), width, height)
        flat = PIL.Image.new("RGB", fitted.size, BACKGROUND)
        flat.paste(fitted, mask=fitted.getchannel("A"))
        return flat
    return fit_image(image.convert("RGB"), width, height)


def fitted_alpha(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """The input image's alpha channel, fitted like the image (mode L)."""
    if not has_alpha(image):
        raise ConditioningError(
            f"mask: source 'alpha' needs an input image with transparency; it is "
            f"{image.mode} without an alpha channel"
        )
    return fit_image(_rgba(image), width, height).getchannel("A")


def build_mask(
    spec: MaskSpec,
    *,
    image: PIL.Image.Image,
    mask: PIL.Image.Image | None,
    width: int,
    height: int,
) -> PIL.Image.Image:
    """The inpaint mask at width x height: mode L, 255 where generated, 0 where kept.

    ``image`` and ``mask`` are the decoded input and mask images (before fitting).
    """
    if spec.source == "alpha":
        alpha = np.asarray(fitted_alpha(image, width, height))
        # Only fully opaque pixels are kept as they are; soft edges (and the resize's
        # ringing) are generated, then the cut-out is composited back by its alpha.
        values = np.where(alpha == 255, KEEP, GENERATE).astype(np.uint8)
    elif spec.source == "column":
        if mask is None:
            raise ConditioningError("mask: source 'column' but the job has no mask image")
        if mask.size != image.size:
            raise ConditioningError(
                f"mask: the mask image is {mask.width}x{mask.height}, the input image "
                f"{image.width}x{image.height}; they must have the same size"
            )
        gray = np.asarray(fit_image(mask.convert("L"), width, height))
        values = np.where(gray >= 128, GENERATE, KEEP).astype(np.uint8)
    else:
        assert spec.keep_box is not None  # MaskSpec guarantees it for "box"
        left, top, right, bottom = spec.keep_box
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ConditioningError(
                f"mask: keep_box {list(spec.keep_box)} is not a box inside the "
                f"{width}x{height} output (left < right <= width, top < bottom <= height)"
            )
        values = np.full((height, width), GENERATE, dtype=np.uint8)
        values[top:bottom, left:right] = KEEP
    return PIL.Image.fromarray(values)  # uint8 2-D: mode L


def canny_image(image: PIL.Image.Image, low: int, high: int) -> PIL.Image.Image:
    """OpenCV's Canny edges of ``image`` (white on black), as a 3-channel image."""
    import cv2

    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, low, high)
    return PIL.Image.fromarray(np.stack([edges] * 3, axis=-1))  # uint8 HxWx3: RGB


def control_image(spec: ControlNetSpec, fitted: PIL.Image.Image) -> PIL.Image.Image:
    if spec.conditioning == "canny":
        return canny_image(fitted, spec.low_threshold, spec.high_threshold)
    return fitted


def prepare_inputs(
    kind: str,
    options: JobOptions,
    *,
    image: PIL.Image.Image | None,
    mask: PIL.Image.Image | None,
    width: int,
    height: int,
) -> PreparedInputs:
    """Everything a job of ``kind`` renders from, at width x height.

    ``image``/``mask`` are the decoded staged images. Raises :class:`ConditioningError`
    naming what is missing or wrong.
    """
    try:
        return _prepare(kind, options, image=image, mask=mask, width=width, height=height)
    except ConditioningError:
        raise
    except ValueError as exc:  # PIL or OpenCV refusing the job's image (a mode it cannot convert)
        raise ConditioningError(f"input image: cannot be used ({exc})") from exc


def _prepare(
    kind: str,
    options: JobOptions,
    *,
    image: PIL.Image.Image | None,
    mask: PIL.Image.Image | None,
    width: int,
    height: int,
) -> PreparedInputs:
    if kind not in KINDS:
        raise ConditioningError(f"kind: unknown job kind {kind!r}; expected {', '.join(KINDS)}")
    if kind == TXT2IMG:
        return PreparedInputs()
    if image is None:
        raise ConditioningError(f"kind {kind!r} needs an input image; the job has none")
    fitted = fitted_rgb(image, width, height)
    if kind == IMG2IMG:
        strength = options.strength if options.strength is not None else DEFAULT_STRENGTH[kind]
        return PreparedInputs(init_image=fitted, strength=strength)
    if kind == INPAINT:
        if options.mask is None:
            raise ConditioningError("mask: an inpaint job needs a mask (alpha, column or box)")
        strength = options.strength if options.strength is not None else DEFAULT_STRENGTH[kind]
        mask_image = build_mask(options.mask, image=image, mask=mask, width=width, height=height)
        if options.mask.source == "alpha":
            overlay = fit_image(_rgba(image), width, height)
        else:
            overlay = mask_overlay(fitted, mask_image)
        return PreparedInputs(
            init_image=fitted, mask_image=mask_image, overlay=overlay, strength=strength
        )
    if options.controlnet is None:
        raise ConditioningError("controlnet: a controlnet job needs a ControlNet model")
    return PreparedInputs(control_image=control_image(options.controlnet, fitted))


def mask_overlay(init_image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """The input image as an overlay: opaque where the mask is black (kept), transparent
    where it is white (generated)."""
    overlay = init_image.convert("RGBA")
    overlay.putalpha(PIL.ImageOps.invert(mask))
    return overlay


def keep_masked(generated: PIL.Image.Image, overlay: PIL.Image.Image) -> PIL.Image.Image:
    """``overlay`` (RGBA) composited over ``generated``: an opaque overlay pixel is kept
    exactly, a transparent one shows the generated pixel, anything between blends."""
    return PIL.Image.alpha_composite(generated.convert("RGBA"), overlay).convert("RGB")


# --- pipelines --------------------------------------------------------------------------------


def check_controlnet(pipe: Any, controlnet: Any) -> None:
    """Raise ConditioningError if ``controlnet`` was not made for ``pipe``'s UNet (an SD 1.5
    ControlNet on an SDXL model, say), instead of a shape error deep inside the render."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ConditioningError(
            f"controlnet: {type(pipe).__name__} has no UNet to control: ControlNet jobs work "
            "with SD 1.x/2.x and SDXL models only"
        )
    for key in ("cross_attention_dim", "addition_embed_type"):
        expected, actual = unet.config.get(key), controlnet.config.get(key)
        if expected != actual:
            raise ConditioningError(
                f"controlnet: the ControlNet's {key} is {actual!r}, the model's UNet has "
                f"{expected!r}: it was made for another base model (SD 1.x/2.x vs SDXL)"
            )


def kind_pipeline(pipe: Any, kind: str, controlnet: Any = None) -> Any:
    """The pipeline rendering ``kind`` from the base (text-to-image) ``pipe``: the same
    models, device and dtype (diffusers' ``from_pipe`` shares them; nothing is copied).

    The auto pipelines pick the SD 1.x/2.x, SDXL, SD3 or FLUX class from ``pipe``'s class
    and, unlike ``DiffusionPipeline.from_pipe``, do not cast the shared models to another
    dtype. The derived pipeline runs the base one's separate safety step (worker.safety).
    """
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
    )

    from worker import safety

    if kind == TXT2IMG:
        return pipe
    if kind == IMG2IMG:
        derived = AutoPipelineForImage2Image.from_pipe(pipe)
    elif kind == INPAINT:
        # A UNet with 4 input channels (a plain text-to-image model) inpaints by blending the
        # noised input back outside the mask at every step; 9-channel inpainting UNets get
        # the mask as input.
        derived = AutoPipelineForInpainting.from_pipe(pipe)
    elif kind == CONTROLNET:
        if controlnet is None:
            raise ConditioningError("controlnet: no ControlNet model given")
        derived = AutoPipelineForText2Image.from_pipe(pipe, controlnet=controlnet)
    else:
        raise ConditioningError(f"kind: unknown job kind {kind!r}; expected {', '.join(KINDS)}")
    derived.set_progress_bar_config(disable=True)
    safety.share(derived, pipe)
    return derived


def kind_kwargs(kind: str, params: Any, pipe: Any = None) -> dict[str, Any]:
    """The pipeline call's arguments for ``kind`` (``params``: a RenderParams) on ``pipe``
    (the kind's pipeline: its family decides what image-to-image needs)."""
    from worker.families import FLOW_FAMILIES, family_of

    size = {"width": params.width, "height": params.height}
    if kind == TXT2IMG:
        return size
    if kind == IMG2IMG:
        image = {"image": params.init_image, "strength": params.strength}
        # SD's image-to-image pipelines take their size from the (already fitted) image;
        # SD3's and FLUX's default to the model's native size (1024) and resize to it.
        return {**size, **image} if family_of(pipe) in FLOW_FAMILIES else image
    if kind == INPAINT:
        return {
            **size,
            "image": params.init_image,
            "mask_image": params.mask_image,
            "strength": params.strength,
        }
    if kind == CONTROLNET:
        return {
            **size,
            "image": params.control_image,
            "controlnet_conditioning_scale": params.controlnet_scale,
        }
    raise ConditioningError(f"kind: unknown job kind {kind!r}; expected {', '.join(KINDS)}")
