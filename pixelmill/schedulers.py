"""Scheduler (sampler) names: which ones exist and how their spellings map to one name.

Shared by the producer, which checks a template's ``scheduler`` when the file is loaded and
stores the canonical name in the job row (so its dedupe key does not change with the
spelling), and the worker, which builds the scheduler (worker.schedulers). No diffusers import
here: the producer must not need it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Our canonical names and the AUTOMATIC1111 sampler label of each (written into PNG metadata).
SCHEDULER_LABELS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "pndm": "PNDM",
}

# The samplers of few-step (distilled) models (see FEW_STEP_RULES), kept apart from the
# classic ones above: each suits only the models distilled for it. "trailing" timesteps start
# at the last training timestep, as those models were trained to (A1111: "SGM Uniform").
FEW_STEP_SCHEDULER_LABELS: dict[str, str] = {
    "lcm": "LCM",
    "tcd": "TCD",
    "euler_trailing": "Euler (trailing)",
    "euler_a_trailing": "Euler a (trailing)",
    "ddim_trailing": "DDIM (trailing)",
}

# The model's own scheduler: written as "default" (or left out, or null).
DEFAULT_SCHEDULER = "default"

KNOWN_SCHEDULERS: tuple[str, ...] = (DEFAULT_SCHEDULER, *SCHEDULER_LABELS)

# Both our snake_case names and the A1111 labels are accepted, case-insensitively.
_ALIASES: dict[str, str] = {
    **{name: name for name in SCHEDULER_LABELS},
    **{label.lower(): name for name, label in SCHEDULER_LABELS.items()},
    **{name: name for name in FEW_STEP_SCHEDULER_LABELS},
    **{label.lower(): name for name, label in FEW_STEP_SCHEDULER_LABELS.items()},
}


def canonical_scheduler(name: str | None) -> str | None:
    """The canonical name of scheduler ``name``; None for the model's own.

    None, "" and "default" (any case) mean the model's own; "Euler a" and "EULER_A" both mean
    "euler_a". The few-step samplers' names (FEW_STEP_SCHEDULER_LABELS) are accepted too.
    Raises ValueError, naming the known schedulers, for any other name.
    """
    if name is None:
        return None
    key = name.strip().lower()
    if key in ("", DEFAULT_SCHEDULER):
        return None
    canonical = _ALIASES.get(key)
    if canonical is None:
        raise ValueError(
            f"scheduler: unknown scheduler {name!r}; known: {', '.join(KNOWN_SCHEDULERS)}"
        )
    return canonical


# --- few-step sampling ------------------------------------------------------------------------


@dataclass(frozen=True)
class FewStepRule:
    """What a distilled (few-step) model needs: its sampler, its step range and its guidance.

    ``max_guidance`` <= 1 means the model was distilled without classifier-free guidance:
    diffusers then runs the denoiser once per step (no unconditional pass) and no negative
    prompt is encoded. ``eta`` is TCD's gamma (its stochasticity); None where the sampler has
    none.
    """

    method: str
    schedulers: tuple[str, ...]  # the first is the one used when the template names none
    min_steps: int
    max_steps: int
    default_steps: int
    guidance: float  # used when the template gives none
    max_guidance: float
    eta: float | None = None
    about: str = ""

    def default_scheduler(self) -> str:
        return self.schedulers[0]


# After each model's published recipe (diffusers' docs and the model cards).
FEW_STEP_RULES: dict[str, FewStepRule] = {
    rule.method: rule
    for rule in (
        # LCM and LCM-LoRA: guidance 1 (none) to 2; LCM-distilled UNets embed the guidance.
        FewStepRule("lcm", ("lcm",), 1, 8, 4, 1.0, 2.0, about="LCM / LCM-LoRA"),
        # TCD-LoRA: its sampler with gamma 0.3; no CFG.
        FewStepRule("tcd", ("tcd",), 1, 16, 4, 0.0, 1.0, eta=0.3, about="TCD-LoRA"),
        # SDXL-Lightning (1/2/4/8-step LoRAs or UNets): Euler, trailing timesteps, no CFG.
        FewStepRule("lightning", ("euler_trailing",), 1, 8, 4, 0.0, 1.0, about="SDXL-Lightning"),
        # Hyper-SD LoRAs: DDIM trailing (N-step) or TCD (the 1-step unified one, gamma 1);
        # the "CFG" variants keep guidance up to 8.
        FewStepRule(
            "hyper_sd", ("ddim_trailing", "tcd"), 1, 16, 4, 0.0, 8.0, eta=1.0, about="Hyper-SD"
        ),
        # SDXL-Turbo / SD-Turbo: Euler ancestral, trailing, trained without guidance.
        FewStepRule("turbo", ("euler_a_trailing",), 1, 4, 1, 0.0, 0.0, about="SDXL-Turbo"),
    )
}


def few_step_rule(method: str) -> FewStepRule:
    """The rule of few-step ``method``; ValueError naming the known ones for any other."""
    rule = FEW_STEP_RULES.get(method.strip().lower()) if isinstance(method, str) else None
    if rule is None:
        raise ValueError(f"unknown few-step method {method!r}; known: {', '.join(FEW_STEP_RULES)}")
    return rule


def uses_guidance(guidance: float) -> bool:
    """Whether diffusers runs classifier-free guidance (an unconditional pass) at ``guidance``:
    only above 1. At or below it the denoiser runs once per step and a negative prompt is
    unused."""
    return guidance > 1
