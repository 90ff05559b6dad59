"""Rendering a job's seeds in batches with a pipeline loaded by :mod:`worker.loading`.

Each seed gets its own generator and every call a fresh scheduler, so an image depends only on
(model, params, seed): re-rendering a single seed later (retries, "re-roll just this one" in
review) reproduces what the sweep produced. (Batched and single renders start from
bit-identical noise; PyTorch kernels are not batch-invariant, so their pixels may differ by a
rounding step in a few places: see tests/worker/test_pipeline.py.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch

# Imported from its module: under mypy, `from diffusers import DiffusionPipeline` resolves
# to diffusers' dummy placeholder class.
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from db.job_options import EmbeddingRef, LoraRef, SamplingSpec
from pixelmill.families import FLUX, true_cfg_runs
from pixelmill.schedulers import canonical_scheduler, uses_guidance
from worker import conditioning
from worker.adapters import applied_adapters
from worker.errors import JobInputError
from worker.families import check_family_inputs, family_of
from worker.fast_path import PLAIN, FastPath, applied_fast_path, denoiser_of
from worker.loading import NullPipeline, keep_flagged_pixels
from worker.prompt_weights import (
    encode_prompts,
    needs_weighting,
    parse_prompt_attention,
    plain_text,
)
from worker.safety import separate_safety_flags
from worker.schedulers import apply_scheduler, share_default_scheduler


@dataclasses.dataclass(frozen=True)
class RenderParams:
    """What one render call needs. ``prompt``/``negative_prompt`` are as the user wrote them
    (A1111 weights included); the kind's images are already at width x height
    (:func:`worker.conditioning.prepare_inputs`)."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str | None = None  # None/"default" = the model's own
    kind: str = conditioning.TXT2IMG
    init_image: PIL.Image.Image | None = None  # img2img, inpaint: RGB
    mask_image: PIL.Image.Image | None = None  # inpaint: L, white generated, black kept
    # inpaint: the RGBA image composited over the result, its opaque pixels kept exactly
    # (conditioning.keep_masked); None: init_image where mask_image is black.
    overlay: PIL.Image.Image | None = None
    control_image: PIL.Image.Image | None = None  # controlnet: RGB
    strength: float | None = None  # img2img, inpaint
    controlnet: Any = None  # controlnet: a loaded ControlNetModel (PipelineCache.controlnet)
    controlnet_scale: float = 1.0
    loras: tuple[LoraRef, ...] = ()
    embeddings: tuple[EmbeddingRef, ...] = ()
    # A few-step model's sampling (its scheduler, steps and guidance are the fields above).
    sampling: SamplingSpec | None = None
    # How the denoiser and VAE run (worker.fast_path.job_fast_path); None: plain.
    fast_path: FastPath | None = None
    # FLUX.1's true CFG scale (diffusers' true_cfg_scale): above 1, an unconditional pass on
    # the negative prompt per step; None: none (FLUX then reads no negative prompt).
    true_cfg: float | None = None


@dataclasses.dataclass(frozen=True)
class RenderedImage:
    image: PIL.Image.Image
    seed: int
    nsfw: bool | None  # None when the pipeline has no safety checker
    seconds: float  # this image's share of its batch's render time
    # The decoded image as the pipeline gave it, (3, H, W) floats in [0, 1] on the render
    # device (inpaint: with the kept pixels composited, as in ``image``): what the scorer
    # reads, with no round trip through PIL. None for a flagged image whose checker left it
    # un-normalised (it is not scored).
    pixels: torch.Tensor | None = None
    # How it was rendered beyond the job's columns (fast path, few-step sampling, guidance),
    # for the image's "pixelmill" PNG chunk.
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- inputs -------------------------------------------------------------------------------


def check_inputs(params: RenderParams) -> None:
    """Raise JobInputError (a BadInputError, so a ValueError), naming the offending field, if
    ``params`` cannot be rendered."""
    try:
        _check_params(params)
    except ValueError as exc:  # a field's check, the scheduler's name or the prompt's weights
        raise JobInputError(str(exc)) from exc


def _check_params(params: RenderParams) -> None:
    for field in ("width", "height"):
        value = getattr(params, field)
        # bool is an int subclass; True is not a size.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
            raise ValueError(f"{field} must be a positive multiple of 8, got {value!r}")
    if isinstance(params.steps, bool) or not isinstance(params.steps, int) or params.steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {params.steps!r}")
    guidance = params.guidance
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, int | float)
        or not math.isfinite(guidance)
        or guidance < 0
    ):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    true_cfg = params.true_cfg
    if true_cfg is not None and (
        isinstance(true_cfg, bool)
        or not isinstance(true_cfg, int | float)
        or not math.isfinite(true_cfg)
        or true_cfg <= 1
    ):
        raise ValueError(f"true_cfg must be a finite number above 1 (or none), got {true_cfg!r}")
    if not isinstance(params.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(params.prompt).__name__}")
    if not isinstance(params.negative_prompt, str):
        raise ValueError(
            f"negative_prompt must be a string, got {type(params.negative_prompt).__name__}"
        )
    canonical_scheduler(params.scheduler)
    for field in ("prompt", "negative_prompt"):
        try:
            parse_prompt_attention(getattr(params, field))
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from exc
    _check_kind_inputs(params)


def _check_image(params: RenderParams, field: str, mode: str) -> None:
    image = getattr(params, field)
    if image is None:
        raise ValueError(f"{field} is required for a {params.kind} job")
    if image.size != (params.width, params.height) or image.mode != mode:
        raise ValueError(
            f"{field} must be a {mode} image of {params.width}x{params.height}, got "
            f"{image.mode} {image.width}x{image.height}"
        )


def _check_kind_inputs(params: RenderParams) -> None:
    kind = params.kind
    if kind not in conditioning.KINDS:
        known = ", ".join(conditioning.KINDS)
        raise ValueError(f"kind: unknown job kind {kind!r}; expected {known}")
    if kind in (conditioning.IMG2IMG, conditioning.INPAINT):
        _check_image(params, "init_image", "RGB")
        strength = params.strength
        if (
            isinstance(strength, bool)
            or not isinstance(strength, int | float)
            or not 0 < strength <= 1
        ):
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        # diffusers runs int(steps * strength) denoising steps and refuses zero.
        if int(params.steps * strength) < 1:
            raise ValueError(
                f"steps x strength must be at least 1 (got {params.steps} x {strength}): raise "
                "the steps or the strength"
            )
    if kind == conditioning.INPAINT:
        _check_image(params, "mask_image", "L")
        if params.overlay is not None:
            _check_image(params, "overlay", "RGBA")
    if kind == conditioning.CONTROLNET:
        _check_image(params, "control_image", "RGB")
        scale = params.controlnet_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale < 0:
            raise ValueError(f"controlnet_scale must be a number >= 0, got {scale!r}")


# --- rendering ----------------------------------------------------------------------------


def render_batch(
    pipe: DiffusionPipeline, params: RenderParams, seeds: list[int]
) -> list[RenderedImage]:
    """Render one image per seed in a single pipeline call.

    Each seed has its own generator: the initial latents (and any ancestral noise) of an
    image come from its seed alone, whatever else is in the batch. ``pipe`` is the cached
    base (text-to-image) pipeline; other kinds render through a pipeline made from it
    (:func:`worker.conditioning.kind_pipeline`). The job's adapters are loaded for this call
    and removed after it (:func:`worker.adapters.applied_adapters`), even on error.
    """
    check_inputs(params)
    if not seeds:
        raise ValueError("seeds must not be empty")
    if isinstance(pipe, NullPipeline):
        return _keep_masked(params, _render_null(params, seeds))
    check_family_inputs(pipe, params)  # what SD3 and FLUX do not take, named
    if params.kind == conditioning.CONTROLNET and params.controlnet is None:
        raise ValueError("controlnet: a controlnet job needs a loaded ControlNet model")
    fast = params.fast_path or PLAIN
    # The fast path first: the adapters' snapshot then sees the modules as the job has them.
    with (
        applied_fast_path(pipe, fast) as fast_record,
        applied_adapters(pipe, params.loras, params.embeddings),
    ):
        kind_pipe = _kind_pipeline(pipe, params)
        apply_scheduler(kind_pipe, params.scheduler)
        generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in seeds]
        count = len(seeds)
        # Concrete pipelines define __call__; the DiffusionPipeline base class does not.
        run: Callable[..., Any] = kind_pipe
        started = time.perf_counter()
        output = run(
            **_prompt_kwargs(kind_pipe, params, count),
            **conditioning.kind_kwargs(params.kind, params, kind_pipe),
            **_sampling_kwargs(kind_pipe, params),
            num_inference_steps=params.steps,
            **_guidance_kwargs(params),
            num_images_per_prompt=1,
            generator=generators,
            # Tensors on the device, for the scorer; the PNGs' PIL images are made from them
            # once, below, by the same steps diffusers' "pil" output takes (same bytes).
            output_type="pt",
        )
        images = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(output.images))
        seconds = (time.perf_counter() - started) / count
    metadata = _render_metadata(pipe, params, fast_record)
    return _keep_masked(params, _rendered(kind_pipe, output, images, seeds, seconds, metadata))


def _rendered(
    kind_pipe: Any,
    output: Any,
    images: list[PIL.Image.Image],
    seeds: list[int],
    seconds: float,
    metadata: dict[str, Any],
) -> list[RenderedImage]:
    """The batch's images with their safety flags: the pipeline's own checker's, else (SD3,
    FLUX: no checker inside the pipeline) the separate step's."""
    flags = getattr(output, "nsfw_content_detected", None)
    if flags is None:
        flags = separate_safety_flags(kind_pipe, output.images)
    return [
        RenderedImage(
            image=image,
            seed=seed,
            nsfw=None if flags is None else bool(flags[i]),
            seconds=seconds,
            # diffusers leaves a flagged image un-normalised (in [-1, 1]): nothing to score.
            pixels=None if flags is not None and flags[i] else output.images[i],
            metadata=metadata,
        )
        for i, (image, seed) in enumerate(zip(images, seeds, strict=True))
    ]


def _kind_pipeline(pipe: DiffusionPipeline, params: RenderParams) -> Any:
    if params.kind == conditioning.TXT2IMG:
        return pipe
    derived = conditioning.kind_pipeline(pipe, params.kind, params.controlnet)
    share_default_scheduler(derived, pipe)
    # from_pipe builds a new object: flag without blacking out here too.
    keep_flagged_pixels(derived)
    return derived


def _prompt_kwargs(pipe: Any, params: RenderParams, count: int) -> dict[str, Any]:
    """Plain prompts go to the pipeline as text, exactly as before prompt weights existed;
    weighted or over-long ones as compel embeddings (see worker.prompt_weights). Without
    classifier-free guidance nothing reads the negative prompt: it is not encoded."""
    negative_prompt = params.negative_prompt if classifier_free_guidance(pipe, params) else ""
    if needs_weighting(pipe, params.prompt, negative_prompt):
        return encode_prompts(pipe, params.prompt, negative_prompt).pipeline_kwargs(count)
    prompt = plain_text(parse_prompt_attention(params.prompt))
    negative = plain_text(parse_prompt_attention(negative_prompt))
    # FLUX runs true CFG only when given a negative prompt: an empty one is the unconditional
    # pass the job asked for, as in the other families' classifier-free guidance.
    true_cfg = family_of(pipe) == FLUX and true_cfg_runs(params.true_cfg)
    return {
        "prompt": [prompt] * count,
        "negative_prompt": [negative] * count if negative or true_cfg else None,
    }


def _guidance_kwargs(params: RenderParams) -> dict[str, Any]:
    """The guidance scale, and FLUX's true CFG scale where the job sets one (the family
    rules refuse it for the others' pipelines, which take no such argument)."""
    if params.true_cfg is None:
        return {"guidance_scale": params.guidance}
    return {"guidance_scale": params.guidance, "true_cfg_scale": params.true_cfg}


def classifier_free_guidance(pipe: Any, params: RenderParams) -> bool:
    """Whether the render runs an unconditional pass per step (the denoiser twice per step),
    as diffusers decides. FLUX.1 only with true CFG (``true_cfg`` above 1): its guidance is
    an input of the model (dev, ``guidance_embeds``) or absent (schnell), never a second
    pass. The others at guidance above 1 with a denoiser that does not take the guidance as
    an input (an LCM-distilled UNet embeds it: ``time_cond_proj_dim``); SD3 has no such input.
    """
    if family_of(pipe) == FLUX:
        return true_cfg_runs(params.true_cfg)
    config = getattr(denoiser_of(pipe), "config", None)
    embedded = getattr(config, "time_cond_proj_dim", None)
    return uses_guidance(params.guidance) and embedded is None


def _sampling_kwargs(pipe: Any, params: RenderParams) -> dict[str, Any]:
    """TCD's gamma (``eta``) where the job's sampling sets it: diffusers' pipelines pass their
    own ``eta`` (0.0) to the scheduler's step otherwise."""
    sampling = params.sampling
    if sampling is None or sampling.eta is None or canonical_scheduler(params.scheduler) != "tcd":
        return {}
    if "eta" not in inspect.signature(type(pipe).__call__).parameters:
        return {}
    return {"eta": sampling.eta}


def _render_metadata(
    pipe: Any, params: RenderParams, fast_record: dict[str, Any]
) -> dict[str, Any]:
    """What the image's metadata records beyond the job's columns (worker.png)."""
    from worker.png import render_record

    return render_record(
        fast_path=fast_record,
        sampling=None if params.sampling is None else params.sampling.model_dump(mode="json"),
        classifier_free_guidance=classifier_free_guidance(pipe, params),
        true_cfg=params.true_cfg,
    )


def _keep_masked(params: RenderParams, rendered: list[RenderedImage]) -> list[RenderedImage]:
    """Inpaint: the kept pixels are exactly the input's (the VAE would shift them slightly)."""
    if params.kind != conditioning.INPAINT:
        return rendered
    overlay = params.overlay
    if overlay is None:
        assert params.init_image is not None and params.mask_image is not None  # check_inputs
        overlay = conditioning.mask_overlay(params.init_image, params.mask_image)
    kept = _overlay_tensor(overlay, rendered)
    return [
        dataclasses.replace(
            image,
            image=conditioning.keep_masked(image.image, overlay),
            pixels=None if image.pixels is None or kept is None else _composite(image.pixels, kept),
        )
        for image in rendered
    ]


def _overlay_tensor(overlay: PIL.Image.Image, rendered: list[RenderedImage]) -> torch.Tensor | None:
    """The overlay as (4, H, W) floats in [0, 1] beside the batch's pixels (None: none)."""
    pixels = next((image.pixels for image in rendered if image.pixels is not None), None)
    if pixels is None:
        return None
    array = np.asarray(overlay.convert("RGBA"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).to(pixels.device, pixels.dtype)


def _composite(pixels: torch.Tensor, overlay: torch.Tensor) -> torch.Tensor:
    """``overlay`` over ``pixels``, as :func:`worker.conditioning.keep_masked` does to the PIL
    image (up to its integer rounding)."""
    alpha = overlay[3:4]
    return pixels * (1 - alpha) + overlay[:3] * alpha


def job_scheduler(pipe: DiffusionPipeline, name: str | None) -> Any:
    """The scheduler (class and config) a render with scheduler ``name`` on ``pipe`` uses, as
    :func:`render_batch` installs it (a kind's pipeline shares the base model's default)."""
    apply_scheduler(pipe, name)
    return getattr(pipe, "scheduler")  # noqa: B009


def render_seed(pipe: DiffusionPipeline, params: RenderParams, seed: int) -> RenderedImage:
    """Render one image for ``seed``. Same (pipe, params, seed) -> pixel-identical image."""
    return render_batch(pipe, params, [seed])[0]


@functools.lru_cache(maxsize=8)
def _grey(height: int, width: int) -> torch.Tensor:
    """The null model's pixels, made once per size: the null model measures the system's own
    cost per job, and allocating a tensor per batch is not part of it. Never written to."""
    return torch.full((3, height, width), 128 / 255)


def _render_null(params: RenderParams, seeds: list[int]) -> list[RenderedImage]:
    started = time.perf_counter()
    images = [PIL.Image.new("RGB", (params.width, params.height), (128, 128, 128)) for _ in seeds]
    grey = _grey(params.height, params.width)
    seconds = (time.perf_counter() - started) / len(seeds)
    return [
        RenderedImage(image=image, seed=seed, nsfw=None, seconds=seconds, pixels=grey)
        for image, seed in zip(images, seeds, strict=True)
    ]
