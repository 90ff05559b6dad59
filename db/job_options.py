"""The shape of ``jobs.options``: what a job needs beyond a prompt, as the producer writes it
and the worker reads it.

The producer builds a :class:`JobOptions` from the template (checked, paths resolved, adapter
files hashed) and stores :meth:`JobOptions.to_json`; the worker reads it back with
:meth:`JobOptions.from_json`. Everything here determines pixels, so the dedupe key covers the
canonical JSON (:meth:`JobOptions.canonical`). A plain txt2img job with no adapters stores
None, and its dedupe key is the same as before options existed.

Conventions (diffusers' own): a mask is white where pixels are generated and black where they
are kept. The input image is fitted to the job's size (centre crop to the aspect ratio, then
resize) before use, so boxes are in output pixels.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraRef(_Frozen):
    """A LoRA file (diffusers/kohya ``.safetensors``) applied with ``scale``."""

    path: str  # absolute, as the workers see it (like a local model path)
    scale: float = 1.0
    sha256: str = Field(min_length=64, max_length=64)  # of the file, at produce time


class EmbeddingRef(_Frozen):
    """A Textual Inversion embedding bound to ``token`` (used in the prompt as written)."""

    path: str
    token: str = Field(min_length=1)
    sha256: str = Field(min_length=64, max_length=64)


class MaskSpec(_Frozen):
    """Where an inpaint job's mask comes from.

    - ``alpha``: the input image's alpha channel; opaque pixels (the product) are kept.
    - ``column``: a mask image staged from a catalogue column (``jobs.mask_image``); white is
      generated, black kept; it must have the input image's size.
    - ``box``: ``keep_box`` = [left, top, right, bottom] in output pixels is kept, the rest
      generated.
    """

    source: Literal["alpha", "column", "box"]
    keep_box: tuple[int, int, int, int] | None = None

    @model_validator(mode="after")
    def _box_only_for_box(self) -> MaskSpec:
        if (self.source == "box") != (self.keep_box is not None):
            raise ValueError("keep_box is given exactly when the mask source is 'box'")
        return self


class ControlNetSpec(_Frozen):
    """A ControlNet and how its control image is made from the job's input image."""

    model: str  # a diffusers ControlNet folder (or hub id), as the workers see it
    # "canny": edges of the input image (OpenCV's Canny with these thresholds);
    # "image": the input image is the control image already (a depth map, a pose, ...).
    conditioning: Literal["canny", "image"] = "canny"
    scale: float = Field(default=1.0, ge=0)
    low_threshold: int = Field(default=100, ge=0, le=255)
    high_threshold: int = Field(default=200, ge=0, le=255)


FewStepMethod = Literal["lcm", "tcd", "lightning", "hyper_sd", "turbo"]
# torch.compile's modes; "off" leaves the module uncompiled.
CompileMode = Literal[
    "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
]


class SamplingSpec(_Frozen):
    """A few-step (distilled) model's sampling: its scheduler, steps and guidance are the
    job's own columns, set by the producer from the method's rule
    (pixelmill.schedulers.FEW_STEP_RULES); ``eta`` is TCD's gamma (None: no TCD)."""

    method: FewStepMethod
    eta: float | None = Field(default=None, ge=0, le=1)


# The fast-path options that render the same pixels within rounding (worker.fast_path states
# the tolerance): they are left out of the dedupe key, so turning them on re-renders nothing.
EXACT_FAST_PATH_OPTIONS = frozenset({"channels_last", "fuse_qkv", "compile"})


# The largest true CFG scale a job may ask for (the template loader's bound too).
MAX_TRUE_CFG = 50


class FastPathSpec(_Frozen):
    """A template's fast-path choices (None: the worker's settings decide). ``fp8`` and
    ``deepcache_interval`` change pixels (the dedupe key covers them); the others do not."""

    channels_last: bool | None = None
    fuse_qkv: bool | None = None
    compile: CompileMode | None = None
    fp8: bool = False  # FP8 dynamic quantisation of the denoiser's linear layers (Hopper)
    deepcache_interval: int | None = Field(default=None, ge=2, le=10)  # DeepCache: approximate


class JobOptions(_Frozen):
    strength: float | None = Field(default=None, gt=0, le=1)  # img2img (and inpaint)
    mask: MaskSpec | None = None  # inpaint
    controlnet: ControlNetSpec | None = None  # controlnet
    loras: tuple[LoraRef, ...] = ()
    embeddings: tuple[EmbeddingRef, ...] = ()
    sampling: SamplingSpec | None = None  # a few-step model's sampling
    fast_path: FastPathSpec | None = None
    # FLUX.1's true CFG scale (diffusers' true_cfg_scale): an unconditional pass on the
    # negative prompt per step; None: none. Other families refuse it (pixelmill.families).
    true_cfg: float | None = Field(default=None, gt=1, le=MAX_TRUE_CFG)

    def is_empty(self) -> bool:
        return self == JobOptions()

    def to_json(self) -> dict[str, Any] | None:
        """The column's value: None when there is nothing beyond a plain prompt."""
        if self.is_empty():
            return None
        return self.model_dump(mode="json", exclude_defaults=True)

    def stored(self) -> str:
        """Sorted-key JSON of :meth:`to_json` ("" when empty): the job's options column, every
        choice included (the worker renders with them, exact fast-path ones too)."""
        value = self.to_json()
        return "" if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))

    def canonical(self) -> str:
        """Sorted-key JSON of :meth:`to_json` ("" when empty), less the fast-path choices
        that do not change pixels: what the dedupe key covers."""
        value = self.to_json()
        if value is None:
            return ""
        fast_path = value.pop("fast_path", None) or {}
        pixels = {k: v for k, v in fast_path.items() if k not in EXACT_FAST_PATH_OPTIONS}
        if pixels:
            value["fast_path"] = pixels
        if not value:
            return ""  # only exact fast-path choices: the plain job's key
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> JobOptions:
        return cls() if value is None else cls.model_validate(value)
