"""Model families beyond SD 1.x/2.x and SDXL: SD3/SD3.5 and FLUX.1, and the rules each follows.

A family is read from the pipeline class diffusers loads (model_index.json's ``_class_name``).
What differs from the UNet families, and is handled here:

- **Precision.** Both are trained and released in bfloat16: on CUDA they compute in bf16
  (SD keeps fp16). Their T5-XXL text encoder (4.7B parameters, 9.5 GB in bf16) overflows in
  fp16; it runs in the pipeline's dtype, or stored in fp8 (``PIXELMILL_T5_PRECISION=fp8``:
  weights kept in float8_e4m3fn, each layer cast up to the compute dtype for its forward
  pass, about 40% less memory for the encoder; pixels change slightly, which the image's
  metadata records).
- **Offload.** ``PIXELMILL_MODEL_OFFLOAD=model`` (one model at a time on the GPU) or
  ``sequential`` (layer by layer: least memory, slowest), off by default; CUDA only.
- **Inputs.** The rules are the ground's (pixelmill.families), which the producer applies
  too, to templates whose model is a local folder; the worker applies them to every job with
  the family of the pipeline it loaded (the last line of defence). Flow-matching models
  render with their own scheduler only; prompt weights (compel) exist for CLIP-only models,
  not for T5-conditioned ones; FLUX.1 is guidance-distilled: dev takes its guidance as an
  input (``guidance`` is that value, 3.5 typical), schnell takes none (``guidance`` must be
  0), and both read a negative prompt only with true CFG (``true_cfg`` above 1: diffusers'
  ``true_cfg_scale``, an unconditional pass per step). ControlNets, LoRAs and Textual
  Inversion are SD/SDXL only here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from pixelmill.families import (
    FLOW_FAMILIES,
    FLUX,
    NULL,
    SD3,
    FamilyInputs,
    ModelFamily,
    family_of_class,
    flow_variant,
)
from pixelmill.families import LABELS as LABELS  # worker.prompt_weights reads it from here
from pixelmill.families import check_family_inputs as check_family_rules

if TYPE_CHECKING:
    from pixelmill.settings import Settings

# The pipeline component holding each family's T5 encoder.
T5_COMPONENTS = {SD3: "text_encoder_3", FLUX: "text_encoder_2"}

T5Precision = Literal["auto", "fp8"]
Offload = Literal["none", "model", "sequential"]
T5_PRECISIONS: tuple[T5Precision, ...] = ("auto", "fp8")
OFFLOADS: tuple[Offload, ...] = ("none", "model", "sequential")


def family_of(pipe: Any) -> str:
    """The family of a loaded pipeline (or one made from it with ``from_pipe``)."""
    return family_of_class(type(pipe).__name__)


def variant_of(pipe: Any) -> str | None:
    """Which release of its family a pipeline's architecture is: FLUX.1 "dev" (guidance
    embedded) or "schnell"; SD3 "3-medium", "3.5-large" (its attention has qk norms) or
    "3.5-medium" (it also has dual attention layers). None for the others."""
    family = family_of(pipe)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or family not in FLOW_FAMILIES:
        return None
    return flow_variant(family, transformer.config)


@dataclasses.dataclass(frozen=True)
class FamilyOptions:
    """How the worker loads the families' models (settings; defaults: nothing special)."""

    t5_precision: T5Precision = "auto"
    offload: Offload = "none"
    # A StableDiffusionSafetyChecker (folder or hub id) run after decoding for models that
    # have no checker of their own; None: only a checker shipped in the model's folder.
    safety_checker_model: str | None = None

    def __post_init__(self) -> None:
        if self.t5_precision not in T5_PRECISIONS:
            raise ValueError(
                f"t5_precision: {self.t5_precision!r}; expected one of {', '.join(T5_PRECISIONS)}"
            )
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload: {self.offload!r}; expected one of {', '.join(OFFLOADS)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> FamilyOptions:
        return cls(
            t5_precision=settings.t5_precision,
            offload=settings.model_offload,
            safety_checker_model=settings.safety_checker_model or None,
        )

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError for options this worker cannot run with (at its start, not per
        job): offloading moves models between CPU memory and an accelerator (CUDA only),
        and a configured checker must be a folder that exists or a hub id."""
        from pixelmill.settings import is_hub_id

        if self.offload != "none" and device.type != "cuda":
            raise ValueError(
                f"PIXELMILL_MODEL_OFFLOAD={self.offload} offloads to CPU memory from a CUDA "
                f"device; this worker renders on {device}: set it to none"
            )
        checker = self.safety_checker_model
        if checker and not (Path(checker).expanduser().exists() or is_hub_id(checker)):
            raise ValueError(
                f"PIXELMILL_SAFETY_CHECKER_MODEL: {checker}: neither a folder nor a hub id"
            )


def compute_dtype(family: str, device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """bfloat16 for SD3/FLUX on CUDA (their released precision), ``fallback`` otherwise."""
    if family in FLOW_FAMILIES and device.type == "cuda":
        return torch.bfloat16
    return fallback


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- after loading ----------------------------------------------------------------------------

# T5's feed-forward output layer casts its input to its own weight's dtype (transformers keeps
# it in fp32 for fp16 models), so it must stay in the compute dtype; embeddings too, so that
# the encoder's `dtype` (its first parameter's), which the pipelines cast T5's output to, is the
# compute dtype and not fp8.
_T5_KEEP_PATTERNS = (r"DenseReluDense\.wo$",)


def store_t5_in_fp8(encoder: torch.nn.Module, compute: torch.dtype) -> None:
    """Keep ``encoder``'s linear weights in float8_e4m3fn, cast up to ``compute`` per layer."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    apply_layerwise_casting(
        encoder,
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=compute,
        skip_modules_pattern=(*DEFAULT_SKIP_MODULES_PATTERN, *_T5_KEEP_PATTERNS),
        skip_modules_classes=(torch.nn.Embedding,),
    )


def t5_encoder(pipe: Any) -> Any:
    """The pipeline's T5 encoder (a transformers T5EncoderModel), None for other families."""
    component = T5_COMPONENTS.get(family_of(pipe))
    return None if component is None else getattr(pipe, component, None)


def place(pipe: Any, device: torch.device, options: FamilyOptions) -> None:
    """Put a freshly loaded pipeline on ``device`` (or offload it), T5 stored as asked."""
    encoder = t5_encoder(pipe)
    if encoder is not None and options.t5_precision == "fp8":
        # The weights are cast to fp8 where they are (CPU), then moved: a quarter of the
        # transfer, and the GPU never holds the bf16 copy.
        store_t5_in_fp8(encoder, compute=getattr(pipe, "transformer").dtype)  # noqa: B009
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


@dataclasses.dataclass(frozen=True)
class FamilyInfo:
    """What the image's metadata says about how its model was run."""

    name: str
    variant: str | None = None
    dtype: str | None = None  # the denoiser's compute dtype
    t5: str | None = None  # the T5 encoder's storage: a dtype, or "float8_e4m3fn"
    offload: str = "none"
    safety: str | None = None  # where a separate safety step's checker came from

    def metadata(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


def describe(pipe: Any, options: FamilyOptions, *, safety: str | None = None) -> FamilyInfo:
    family = family_of(pipe)
    if family == NULL:
        return FamilyInfo(name=NULL)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    encoder = t5_encoder(pipe)
    t5 = None
    if encoder is not None:
        t5 = "float8_e4m3fn" if options.t5_precision == "fp8" else dtype_name(encoder.dtype)
    return FamilyInfo(
        name=family,
        variant=variant_of(pipe),
        dtype=None if denoiser is None else dtype_name(denoiser.dtype),
        t5=t5,
        offload=options.offload,
        safety=safety,
    )


# --- a job's inputs ----------------------------------------------------------------------------


def size_multiple(pipe: Any) -> int:
    """Image sizes a flow-family pipeline renders without resizing: latents are an eighth of the
    image (the VAE) and the transformer reads them in 2x2 patches (SD3) or packs (FLUX)."""
    return int(getattr(pipe, "vae_scale_factor", 8)) * 2


def model_family(pipe: Any) -> ModelFamily:
    """What the family rules need to know of a loaded pipeline."""
    family = family_of(pipe)
    multiple = size_multiple(pipe) if family in FLOW_FAMILIES else None
    return ModelFamily(family, variant_of(pipe), multiple, type(pipe).__name__)


def check_family_inputs(pipe: Any, params: Any) -> None:
    """Raise FamilyInputError (or PromptWeightsError), naming the field, if ``params`` (a
    RenderParams) asks ``pipe``'s family for something it does not do: the rules of
    pixelmill.families, which the producer applies to a template whose model it can read,
    checked again here for every job. SD and SDXL accept everything but true CFG."""
    from worker.prompt_weights import check_unweighted

    model = model_family(pipe)
    if model.name in FLOW_FAMILIES:
        check_unweighted(pipe, params.prompt, params.negative_prompt)
    check_family_rules(
        model,
        FamilyInputs(
            negative_prompt=params.negative_prompt,
            guidance=params.guidance,
            width=params.width,
            height=params.height,
            true_cfg=params.true_cfg,
            scheduler=params.scheduler,
            kind=params.kind,
            sampling=getattr(params, "sampling", None) is not None,
            loras=bool(params.loras),
            embeddings=bool(params.embeddings),
        ),
    )
