"""PNG encoding with AUTOMATIC1111-compatible generation metadata.

Tools that read A1111 images (the web UI's "PNG Info" tab, civitai, image browsers) look
for a text chunk named "parameters" holding a prompt block followed by one settings line.
pixelmill adds its own "pixelmill" chunk (JSON): what no A1111 field holds, such as the job,
the catalogue item, the model's full sha256 and the safety verdict.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import PIL.PngImagePlugin

PARAMETERS_KEY = "parameters"
PIXELMILL_KEY = "pixelmill"


def a1111_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_name: str,
    model_hash: str | None,
    version: str,
    extra: Sequence[tuple[str, str]] = (),
    schedule_type: str | None = None,
) -> str:
    """The A1111 "parameters" text, e.g.::

    a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 123, Size: 512x512, Model hash: ...

    ``schedule_type`` (A1111's "Schedule type", e.g. "Karras") follows the sampler.
    ``extra`` settings (e.g. ``("Denoising strength", "0.5")``) go after the model, before
    the version; a value with a comma, colon or quote is quoted as A1111 does.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    settings = [
        f"Steps: {steps}",
        f"Sampler: {sampler}",
        *([f"Schedule type: {schedule_type}"] if schedule_type else []),
        f"CFG scale: {float(cfg_scale)}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
    ]
    if model_hash is not None:
        settings.append(f"Model hash: {model_hash}")
    settings.append(f"Model: {model_name}")
    settings.extend(f"{name}: {_quote(value)}" for name, value in extra)
    settings.append(f"Version: {version}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


@dataclass(frozen=True)
class A1111Sampler:
    """A scheduler as A1111 names it: its "Sampler" and "Schedule type" (None: none)."""

    name: str
    schedule_type: str | None


# diffusers scheduler classes -> A1111's sampler names (its k-diffusion and timestep samplers,
# after diffusers' own table of A1111 equivalents). PNDM with its Runge-Kutta warm-up skipped,
# as every Stable Diffusion config has it, is the PLMS sampler.
_A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    "TCDScheduler": "TCD",  # Forge's name (A1111 itself has no TCD sampler)
}
# DPMSolverMultistepScheduler, by (algorithm_type, solver_order).
_DPM_MULTISTEP: dict[tuple[object, object], str] = {
    ("dpmsolver++", 2): "DPM++ 2M",
    ("sde-dpmsolver++", 2): "DPM++ 2M SDE",
    ("sde-dpmsolver++", 3): "DPM++ 3M SDE",
}
# diffusers' sigma options -> A1111's schedule types.
_SCHEDULE_TYPES = {
    "use_karras_sigmas": "Karras",
    "use_exponential_sigmas": "Exponential",
    "use_beta_sigmas": "Beta",
}
# Since 1.9, A1111's "Automatic" schedule is Karras sigmas for these samplers (exponential for
# the SDE ones); the plain sigmas diffusers uses without an option are its "Uniform". For the
# other samplers "Automatic" is the plain schedule, and what A1111 itself writes.
_AUTOMATIC_IS_NOT_PLAIN = {
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 3M SDE",
    "DPM2",
    "DPM2 a",
}
# Before 1.9 had a "Schedule type", Karras sigmas were part of these samplers' names; 1.9 and
# later still read such a name (and split the schedule off it), so a PNG says both "Sampler:
# DPM++ 2M Karras" and "Schedule type: Karras" and pastes into either.
_KARRAS_NAMED = {"DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM2", "DPM2 a", "LMS"}


def a1111_sampler(scheduler: Any) -> A1111Sampler:
    """How A1111 names a diffusers ``scheduler`` (an instance, with its config); one it has no
    sampler for keeps its class name, with no schedule type."""
    kind = type(scheduler).__name__
    config = getattr(scheduler, "config", {})
    if kind == "DPMSolverMultistepScheduler":
        key = (config.get("algorithm_type"), config.get("solver_order"))
        name = _DPM_MULTISTEP.get(key, kind)
    else:
        name = _A1111_SAMPLERS.get(kind, kind)
    if name == kind:
        return A1111Sampler(kind, None)
    plain = "Uniform" if name in _AUTOMATIC_IS_NOT_PLAIN else "Automatic"
    if config.get("timestep_spacing") == "trailing":
        # Timesteps from the last training step down, evenly spaced: A1111's "SGM Uniform",
        # the schedule distilled models (Turbo, Lightning, Hyper-SD) are sampled with.
        plain = "SGM Uniform"
    schedule = next(
        (label for option, label in _SCHEDULE_TYPES.items() if config.get(option)), plain
    )
    if schedule == "Karras" and name in _KARRAS_NAMED:
        name = f"{name} Karras"
    return A1111Sampler(name, schedule)


def render_record(
    *,
    fast_path: dict[str, Any],
    sampling: dict[str, Any] | None,
    classifier_free_guidance: bool,
    true_cfg: float | None = None,
) -> dict[str, Any]:
    """The "pixelmill" chunk's record of how an image was rendered beyond the job's columns:
    the fast path that ran (worker.fast_path.FastPath.record), the few-step sampling (method
    and TCD's eta), whether an unconditional pass ran, and FLUX.1's true CFG scale where the
    job set one. ``approximate`` is true when an option changed pixels beyond rounding (FP8,
    DeepCache)."""
    record: dict[str, Any] = {
        "fast_path": fast_path,
        "classifier_free_guidance": classifier_free_guidance,
        "approximate": bool(fast_path.get("approximate")),
    }
    if sampling is not None:
        record["sampling"] = {key: value for key, value in sampling.items() if value is not None}
    if true_cfg is not None:
        record["true_cfg"] = true_cfg  # FLUX.1's true CFG scale (it changes pixels)
    return record


def _quote(value: str) -> str:
    # A1111's settings line is split on ", " and ": ": such values travel JSON-quoted.
    if any(char in value for char in ',:"'):
        return json.dumps(value, ensure_ascii=False)
    return value


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def encode_png(
    image: PIL.Image.Image,
    *,
    parameters: str,
    pixelmill: dict[str, Any] | None = None,
    compress_level: int = 1,
) -> bytes:
    """PNG bytes of ``image`` with ``parameters`` in a "parameters" text chunk and, if given,
    ``pixelmill`` as JSON in a "pixelmill" chunk.

    tEXt is latin-1 only, so non-latin text (e.g. a Chinese prompt) goes in a UTF-8 iTXt
    chunk instead; the JSON chunk is always iTXt. compress_level 1: nightly batches are
    CPU-bound on encoding, and level 1 is several times faster than the default for only
    slightly larger files.
    """
    info = PIL.PngImagePlugin.PngInfo()
    if _is_latin1(parameters):
        info.add_text(PARAMETERS_KEY, parameters)
    else:
        info.add_itxt(PARAMETERS_KEY, parameters)
    if pixelmill is not None:
        info.add_itxt(PIXELMILL_KEY, json.dumps(pixelmill, ensure_ascii=False, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def _text_chunks(png: bytes) -> dict[str, str]:
    with PIL.Image.open(io.BytesIO(png)) as image:
        if not isinstance(image, PIL.PngImagePlugin.PngImageFile):
            raise ValueError("not a PNG image")
        # .text reads every text chunk, including any after the image data.
        return {str(key): str(value) for key, value in image.text.items()}


def read_pixelmill(png: bytes) -> dict[str, Any] | None:
    """The "pixelmill" JSON chunk of a PNG, or None if it has none."""
    value = _text_chunks(png).get(PIXELMILL_KEY)
    if value is None:
        return None
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError(f"the {PIXELMILL_KEY!r} chunk is not a JSON object")
    return data


def read_parameters(png: bytes) -> str | None:
    """The "parameters" text of a PNG (tEXt, zTXt or iTXt), or None if it has none."""
    return _text_chunks(png).get(PARAMETERS_KEY)
