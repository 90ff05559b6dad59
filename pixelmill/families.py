"""The model families' rules: what SD3/SD3.5 and FLUX.1 take, for the producer and the worker.

A family is read from the pipeline class diffusers loads (model_index.json's ``_class_name``).
Two parts apply the same rules with :func:`check_family_inputs`:

- the producer, at produce time, for a template whose model is a local diffusers folder
  (:func:`read_model_family` reads its model_index.json and configs, nothing else): a template
  that cannot render is one error naming its field, not every job failing in the workers;
- the worker, for every job, with the family of the pipeline it loaded (worker.families): the
  last line of defence, and the only one for a model that cannot be inspected without
  loading or downloading it (a hub id, an alias, a single-file checkpoint).

The rules: flow-matching models render with their own scheduler only, at sizes their latent
packing divides; FLUX.1 is guidance-distilled (dev takes its guidance as an input of the
model, schnell takes none: ``guidance`` must be 0), so it reads a negative prompt only with
true CFG (``true_cfg`` above 1: an unconditional pass per step, twice the denoiser's work);
ControlNets, few-step samplings, LoRAs and Textual Inversion are SD/SDXL only here. True CFG
is FLUX.1's alone: the other families run classifier-free guidance from ``guidance``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.models import JobKind
from pixelmill.errors import BadInputError
from pixelmill.schedulers import canonical_scheduler
from pixelmill.settings import TINY_MODEL

SD = "sd"
SDXL = "sdxl"
SD3 = "sd3"
FLUX = "flux"
NULL = "null"
OTHER = "other"
# The families whose denoiser is a flow-matching transformer conditioned on T5.
FLOW_FAMILIES = (SD3, FLUX)
LABELS = {SD: "SD 1.x/2.x", SDXL: "SDXL", SD3: "SD3", FLUX: "FLUX.1"}

# Class-name prefixes, most specific first (FLUX.2 is another architecture: not FLUX.1).
_CLASS_PREFIXES = (
    ("Flux2", OTHER),
    ("StableDiffusion3", SD3),
    ("Flux", FLUX),
    ("StableDiffusionXL", SDXL),
    ("StableDiffusion", SD),
)
# Model names the worker resolves itself (worker.models: the built-in tiny model, built on
# first use; worker.loading.NULL_MODEL: no model at all), never a folder to read here.
_ALIASES = frozenset({TINY_MODEL, "null"})


class FamilyInputError(BadInputError):
    """A job (or template) asks a model family for something it cannot do; ``field`` names
    the job's field, ``reason`` says why and what to do instead."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.field, self.reason)


def family_of_class(class_name: str) -> str:
    """The family of a diffusers pipeline class name, e.g. "FluxImg2ImgPipeline" -> "flux"."""
    if class_name == "NullPipeline":
        return NULL
    return next(
        (family for prefix, family in _CLASS_PREFIXES if class_name.startswith(prefix)), OTHER
    )


def flow_variant(family: str, transformer_config: Mapping[str, Any]) -> str | None:
    """Which release of its family a transformer's config is: FLUX.1 "dev" (guidance
    embedded) or "schnell"; SD3 "3-medium", "3.5-large" (its attention has qk norms) or
    "3.5-medium" (it also has dual attention layers). None for the other families."""
    if family == FLUX:
        return "dev" if transformer_config.get("guidance_embeds") else "schnell"
    if family != SD3:
        return None
    if transformer_config.get("dual_attention_layers"):
        return "3.5-medium"
    return "3.5-large" if transformer_config.get("qk_norm") else "3-medium"


@dataclass(frozen=True)
class ModelFamily:
    """What the rules need to know of a model: its family, its release (None: unknown) and
    the multiple its image sizes must be (None: unknown, not checked)."""

    name: str
    variant: str | None = None
    size_multiple: int | None = None
    class_name: str | None = None  # the pipeline class, named for a family without a label

    @property
    def label(self) -> str:
        return LABELS.get(self.name) or self.class_name or self.name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeError is a ValueError)
        return None
    return value if isinstance(value, dict) else None


def read_model_family(model: str) -> ModelFamily | None:
    """The family of ``model`` where it is a diffusers folder on this machine, from its
    model_index.json and its transformer's and VAE's config.json. None where knowing it
    would take more than reading local files: a hub id (its model_index.json is a download),
    an alias the worker resolves ("tiny", "null"), a single-file checkpoint, a folder not
    here. The worker checks those jobs once it has loaded the model."""
    if model in _ALIASES:
        return None
    folder = Path(model).expanduser()
    index = _read_json(folder / "model_index.json")
    class_name = None if index is None else index.get("_class_name")
    if not isinstance(class_name, str):
        return None
    family = family_of_class(class_name)
    if family not in FLOW_FAMILIES:
        return ModelFamily(family, class_name=class_name)
    transformer = _read_json(folder / "transformer" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    variant = None if transformer is None else flow_variant(family, transformer)
    size_multiple = None
    blocks = None if vae is None else vae.get("block_out_channels")
    if isinstance(blocks, list) and blocks:
        # The pipelines' vae_scale_factor (2 ** (blocks - 1)), times the transformer's 2x2
        # patches (SD3) or packing (FLUX): what worker.families.size_multiple reads.
        size_multiple = 2 ** (len(blocks) - 1) * 2
    return ModelFamily(family, variant, size_multiple, class_name)


def true_cfg_runs(true_cfg: float | None) -> bool:
    """Whether FLUX.1 runs true CFG (an unconditional pass per step) at ``true_cfg``:
    above 1, as diffusers' FluxPipeline decides (``true_cfg_scale``)."""
    return true_cfg is not None and true_cfg > 1


@dataclass(frozen=True)
class FamilyInputs:
    """What of a job (or template) the family rules read."""

    negative_prompt: str
    guidance: float
    width: int
    height: int
    true_cfg: float | None = None
    scheduler: str | None = None  # any spelling pixelmill.schedulers knows; None: the model's
    kind: str = JobKind.TXT2IMG
    sampling: bool = False  # a few-step sampling is set
    loras: bool = False
    embeddings: bool = False


def check_family_inputs(model: ModelFamily, inputs: FamilyInputs) -> None:
    """Raise FamilyInputError, naming the field, if ``inputs`` ask ``model``'s family for
    something it does not do. SD and SDXL accept everything here but true CFG."""
    label = model.label
    if inputs.true_cfg is not None and model.name != FLUX:
        instead = (
            f"{label} runs classifier-free guidance from guidance above 1: leave true_cfg out"
            if model.name in (SD, SDXL, SD3)
            else "leave it out"
        )
        raise FamilyInputError("true_cfg", f"true CFG is for FLUX.1 models only; {instead}")
    if model.name not in FLOW_FAMILIES:
        return
    if canonical_scheduler(inputs.scheduler) is not None:
        raise FamilyInputError(
            "scheduler",
            f"{label} renders with its own flow-matching scheduler; {inputs.scheduler!r} is "
            "for SD 1.x/2.x and SDXL models: use 'default'",
        )
    if model.name == FLUX:
        _check_flux(model, inputs)
    _check_flow_inputs(model, inputs)


def _check_flux(model: ModelFamily, inputs: FamilyInputs) -> None:
    if inputs.negative_prompt.strip() and not true_cfg_runs(inputs.true_cfg):
        raise FamilyInputError(
            "negative_prompt",
            "FLUX.1 reads a negative prompt only with true CFG (its guidance is distilled into "
            "the model): set true_cfg above 1 to run an unconditional pass per step (the model "
            "then runs twice per step), or leave the negative prompt empty",
        )
    if model.variant == "schnell" and inputs.guidance != 0:
        raise FamilyInputError(
            "guidance",
            f"FLUX.1-schnell takes no guidance (the model has no guidance input), got "
            f"{inputs.guidance:g}: set it to 0",
        )


def _check_flow_inputs(model: ModelFamily, inputs: FamilyInputs) -> None:
    label = model.label
    multiple = model.size_multiple
    for field in ("width", "height"):
        value = getattr(inputs, field)
        if multiple is not None and value % multiple:
            raise FamilyInputError(
                field, f"{label} renders sizes that are multiples of {multiple}, got {value}"
            )
    if inputs.kind == JobKind.CONTROLNET:
        raise FamilyInputError(
            "kind", f"controlnet jobs work with SD 1.x/2.x and SDXL models only, not {label}"
        )
    if inputs.sampling:
        raise FamilyInputError(
            "sampling",
            "the few-step samplings (LCM, TCD, Lightning, Hyper-SD, Turbo) are for SD "
            f"1.x/2.x and SDXL models, not {label}",
        )
    if inputs.loras or inputs.embeddings:
        raise FamilyInputError(
            "loras" if inputs.loras else "embeddings",
            "LoRAs and Textual Inversion embeddings work with SD 1.x/2.x and SDXL models "
            f"only, not {label}",
        )
