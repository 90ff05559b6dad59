"""The safety check as a step of its own, for pipelines that have no safety checker.

SD 1.x/2.x pipelines run their StableDiffusionSafetyChecker inside the pipeline call and
report ``nsfw_content_detected``. SD3 and FLUX pipelines have no checker slot, so the worker
runs one itself after decoding, on the same images the PNGs are made from, with the same
preprocessing diffusers' SD pipeline uses (CLIP's image processor on the PIL images). Its
verdicts are recorded exactly like the built-in checker's: ``flagged`` images go to
quarantine or nowhere (worker.image_writer).

Where the checker comes from, first found:

1. the model's own folder, in SD's layout: ``safety_checker/`` (config.json and weights) and
   ``feature_extractor/`` (preprocessor_config.json), which model_index.json need not list;
2. ``PIXELMILL_SAFETY_CHECKER_MODEL``: a folder (or hub id) holding both files at its root,
   as CompVis/stable-diffusion-safety-checker does, or an SD model folder (1.).

With neither, or with ``PIXELMILL_SAFETY_CHECKER=false``, images are ``unchecked``.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import weakref
from typing import Any

import torch

from pixelmill.settings import is_hub_id

log = logging.getLogger(__name__)

CHECKER_FOLDER = "safety_checker"
PROCESSOR_FOLDER = "feature_extractor"


@dataclasses.dataclass(frozen=True)
class SafetyStep:
    """A loaded checker, its image processor, and where they came from (for the metadata)."""

    checker: Any  # StableDiffusionSafetyChecker on the render device
    processor: Any  # CLIPImageProcessor
    source: str  # "model" (its own folder) or the configured checker's name


# The step each pipeline runs; pipelines made from it with from_pipe share its step. Weak
# keys: evicting a pipeline from the cache frees its checker.
_STEPS: weakref.WeakKeyDictionary[Any, SafetyStep] = weakref.WeakKeyDictionary()


def _sd_layout(folder: pathlib.Path) -> tuple[str, str] | None:
    checker, processor = folder / CHECKER_FOLDER, folder / PROCESSOR_FOLDER
    if (checker / "config.json").is_file() and (processor / "preprocessor_config.json").is_file():
        return str(checker), str(processor)
    return None


def checker_source(model: str, configured: str | None) -> tuple[str, str] | None:
    """The (checker, image processor) locations for ``model``, or None: no checker."""
    own = _sd_layout(pathlib.Path(model).expanduser())
    if own is not None:
        return own
    return configured_source(configured)


def configured_source(configured: str | None) -> tuple[str, str] | None:
    """The (checker, image processor) locations ``PIXELMILL_SAFETY_CHECKER_MODEL`` names."""
    if not configured:
        return None
    folder = pathlib.Path(configured).expanduser()
    if folder.is_dir():
        nested = _sd_layout(folder)
        if nested is not None:
            return nested
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"PIXELMILL_SAFETY_CHECKER_MODEL: {configured}: no safety checker there (neither "
                f"config.json nor {CHECKER_FOLDER}/config.json)"
            )
        return str(folder), str(folder)
    if is_hub_id(configured):
        return configured, configured
    raise FileNotFoundError(f"PIXELMILL_SAFETY_CHECKER_MODEL: folder not found: {configured}")


def load_safety_step(
    model: str, *, configured: str | None, device: torch.device, dtype: torch.dtype
) -> SafetyStep | None:
    """The separate safety step for ``model`` on ``device``, or None when it has no checker."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    source = checker_source(model, configured)
    if source is None:
        return None
    checker_path, processor_path = source
    own = _sd_layout(pathlib.Path(model).expanduser()) is not None
    local = pathlib.Path(checker_path).exists()
    # No dtype argument: its name differs between transformers 4 and 5; cast after loading.
    checker: Any = StableDiffusionSafetyChecker.from_pretrained(
        checker_path, local_files_only=local
    )
    checker = checker.to(device=device, dtype=dtype).eval()
    processor = _image_processor_class().from_pretrained(processor_path, local_files_only=local)
    log.info("safety: %s runs the safety checker %s after decoding", model, checker_path)
    return SafetyStep(
        checker=checker, processor=processor, source="model" if own else str(configured)
    )


def _image_processor_class() -> Any:
    try:
        # transformers 5 without torchvision: the PIL implementation, named directly so no
        # warning says it falls back to it.
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor
    return CLIPImageProcessorPil


def attach(pipe: Any, step: SafetyStep | None) -> None:
    if step is not None:
        _STEPS[pipe] = step


def share(derived: Any, base: Any) -> None:
    """``derived`` (made from ``base`` with from_pipe) runs ``base``'s safety step."""
    step = _STEPS.get(base)
    if step is not None:
        _STEPS[derived] = step


def step_of(pipe: Any) -> SafetyStep | None:
    return _STEPS.get(pipe)


def separate_safety_flags(pipe: Any, images: torch.Tensor) -> list[bool] | None:
    """The checker's verdict on each of ``images`` ((N, 3, H, W) floats in [0, 1], as the
    pipeline returned them), or None when ``pipe`` has no separate safety step."""
    from diffusers.image_processor import VaeImageProcessor

    step = _STEPS.get(pipe)
    if step is None:
        return None
    checker = step.checker
    with torch.no_grad():
        arrays = VaeImageProcessor.pt_to_numpy(images.float())
        features = step.processor(VaeImageProcessor.numpy_to_pil(arrays), return_tensors="pt")
        clip_input = features.pixel_values.to(device=checker.device, dtype=checker.dtype)
        # The checker blacks out what it flags in the array it is given: a copy, since the
        # flagged pixels are kept for review.
        _blacked, flags = checker(images=arrays.copy(), clip_input=clip_input)
    return [bool(flag) for flag in flags]
