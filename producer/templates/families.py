"""A template's true CFG, and its model family's rules checked when the file is loaded.

In a template (or in ``defaults``)::

    model: models/flux-dev    # a FLUX.1 diffusers folder
    negative_prompt: "blurry, text"
    true_cfg: 4               # FLUX.1 only: above 1 (at most 50); null or left out: none

FLUX.1 is guidance-distilled: ``guidance`` goes into the model as an input (dev) or not at
all (schnell, which takes 0), and the model reads no negative prompt. True CFG (diffusers'
``true_cfg_scale``) adds an unconditional pass per step, on the negative prompt (an empty one
is the plain unconditional pass), and mixes the two as classifier-free guidance does: the
negative prompt then works, at twice the denoiser's work. It is a job option: in the dedupe
key (it changes pixels) and in the image's metadata.

Where the template's model is a diffusers folder on this machine, its family is read from
its model_index.json (pixelmill.families.read_model_family) and the family's rules are
checked here, so a template its model cannot render (a negative prompt for FLUX.1 without
true CFG, guidance for schnell, LoRAs for SD3 or FLUX.1, ...) is refused with its line and
field before anything is written. A hub id, an alias ("tiny") or a folder not on this
machine cannot be inspected without a download or the worker's own files: those jobs are
checked by the worker when it has loaded the model, and fail there with the same message.
"""

from __future__ import annotations

from typing import Any, Protocol

import yaml

from db.job_options import MAX_TRUE_CFG
from pixelmill.errors import InputError
from pixelmill.families import FamilyInputs, check_family_inputs, read_model_family
from producer.templates.model import Template

TRUE_CFG_KEY = "true_cfg"

Entry = tuple[yaml.Node, yaml.Node]


class NodeReader(Protocol):
    """What this module needs from the template loader."""

    def error(self, node: yaml.Node | None, field: str | None, reason: str) -> InputError: ...

    def scalar(self, node: yaml.Node) -> Any: ...


def read_true_cfg(
    reader: NodeReader, own: dict[str, Entry], defaults: dict[str, Entry], *, prefix: str
) -> float | None:
    """The template's true CFG scale (its own value wins over defaults'), None for none."""
    if TRUE_CFG_KEY in own:
        field, node = f"{prefix}.{TRUE_CFG_KEY}", own[TRUE_CFG_KEY][1]
    elif TRUE_CFG_KEY in defaults:
        field, node = f"defaults.{TRUE_CFG_KEY}", defaults[TRUE_CFG_KEY][1]
    else:
        return None
    value = reader.scalar(node)
    if value is None:
        return None
    # bool is an int subclass; "true_cfg: yes" is a typo, not 1.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 1 < value <= MAX_TRUE_CFG
    ):
        raise reader.error(
            node,
            field,
            f"must be a number above 1 and at most {MAX_TRUE_CFG} (1 or less runs no true CFG: "
            "leave it out, or null)",
        )
    return float(value)


def check_template_family(template: Template, default_model: str | None = None) -> None:
    """Raise pixelmill.families.FamilyInputError, naming the template's field, if the
    template's model is a diffusers folder here whose family cannot render the template.
    A template that names no model renders with ``default_model`` (produce's). Nothing is
    checked for a model that cannot be read here (the worker checks its jobs)."""
    name = template.model or default_model
    if name is None:
        return
    model = read_model_family(name)
    if model is None:
        return
    options = template.conditioning.options
    check_family_inputs(
        model,
        FamilyInputs(
            negative_prompt=f"{template.preset_negative_prompt} {template.negative_prompt}",
            guidance=template.guidance,
            width=template.width,
            height=template.height,
            true_cfg=options.true_cfg,
            scheduler=template.scheduler,
            kind=template.conditioning.kind,
            sampling=options.sampling is not None,
            loras=bool(options.loras),
            embeddings=bool(options.embeddings),
        ),
    )
