"""Building a job's diffusers scheduler (sampler) from its name, fresh for every render.

The names, their spellings and their A1111 labels are the kernel's (pixelmill.schedulers,
shared with the producer); here each becomes a diffusers scheduler made from the config of the
model's own scheduler.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    TCDScheduler,
)

# Imported from its module: under mypy, `from diffusers import DiffusionPipeline` resolves
# to diffusers' dummy placeholder class.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from pixelmill.schedulers import (
    FEW_STEP_SCHEDULER_LABELS,
    SCHEDULER_LABELS,
    canonical_scheduler,
)


def _dpmpp_2m(config: Any, *, karras: bool) -> Any:
    # Force the DPM++ 2M settings: a model's own config may carry another algorithm/order.
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )


# Canonical name (pixelmill.schedulers, which also maps the other spellings) -> a function
# building a new scheduler instance from a scheduler config. Every name there needs one here
# (tests/worker/test_pipeline.py checks).
_SCHEDULER_FACTORIES: dict[str, Callable[[Any], Any]] = {
    "euler": EulerDiscreteScheduler.from_config,
    "euler_a": EulerAncestralDiscreteScheduler.from_config,
    "ddim": DDIMScheduler.from_config,
    "dpmpp_2m": lambda c: _dpmpp_2m(c, karras=False),
    "dpmpp_2m_karras": lambda c: _dpmpp_2m(c, karras=True),
    "pndm": PNDMScheduler.from_config,
}

# The few-step samplers (pixelmill.schedulers.FEW_STEP_SCHEDULER_LABELS), each as the
# distilled models' recipes build it from the model's own config.
_FEW_STEP_FACTORIES: dict[str, Callable[[Any], Any]] = {
    "lcm": LCMScheduler.from_config,
    "tcd": TCDScheduler.from_config,
    "euler_trailing": lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing"),
    "euler_a_trailing": lambda c: EulerAncestralDiscreteScheduler.from_config(
        c, timestep_spacing="trailing"
    ),
    "ddim_trailing": lambda c: DDIMScheduler.from_config(c, timestep_spacing="trailing"),
}


# The scheduler each pipeline was loaded with, so "default" can be restored after a job
# used another one. Weak keys: evicting a pipeline from the cache must free it.
_DEFAULT_SCHEDULERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def default_scheduler(pipe: DiffusionPipeline) -> Any:
    if pipe not in _DEFAULT_SCHEDULERS:
        # `scheduler` is a component of concrete pipelines, not declared on the base class.
        _DEFAULT_SCHEDULERS[pipe] = getattr(pipe, "scheduler")  # noqa: B009
    return _DEFAULT_SCHEDULERS[pipe]


def apply_scheduler(pipe: DiffusionPipeline, name: str | None) -> None:
    """Install a fresh scheduler called ``name`` (None/"default": the model's own) on ``pipe``.

    A new instance every call: schedulers carry per-run state (multistep history, step
    index), and a fresh one guarantees nothing leaks from one render into the next.
    Building one from a config is cheap (no weights).
    """
    canonical = canonical_scheduler(name)
    default = default_scheduler(pipe)
    # Always derive from the model's own config (not the currently installed scheduler),
    # so the result does not depend on which scheduler the previous job used.
    if canonical is None:
        scheduler = type(default).from_config(default.config)
    else:
        factory = _SCHEDULER_FACTORIES.get(canonical) or _FEW_STEP_FACTORIES[canonical]
        scheduler = factory(default.config)
    # setattr: `scheduler` is not declared on the DiffusionPipeline base class (see above).
    setattr(pipe, "scheduler", scheduler)  # noqa: B010


def scheduler_label(name: str | None, *, pipe: DiffusionPipeline | None = None) -> str:
    """The AUTOMATIC1111 sampler label for ``name``, e.g. "Euler a" or "DPM++ 2M Karras".

    For the model's own scheduler (None/"default") this is the scheduler's class name,
    e.g. "PNDMScheduler", which needs ``pipe``; without it the label is "default".
    """
    canonical = canonical_scheduler(name)
    if canonical is not None:
        return SCHEDULER_LABELS.get(canonical) or FEW_STEP_SCHEDULER_LABELS[canonical]
    if pipe is None:
        return "default"
    return type(default_scheduler(pipe)).__name__


def share_default_scheduler(derived: Any, base: DiffusionPipeline) -> None:
    """Make "default" on ``derived`` (a pipeline made from ``base``) mean the base model's own
    scheduler, whatever ``base`` holds now."""
    _DEFAULT_SCHEDULERS[derived] = default_scheduler(base)
