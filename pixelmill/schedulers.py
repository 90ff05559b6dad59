"""Scheduler (sampler) names: which ones exist and how their spellings map to one name.

Shared by the producer, which checks a template's ``scheduler`` when the file is loaded and
stores the canonical name in the job row (so its dedupe key does not change with the
spelling), and the worker, which builds the scheduler (worker.schedulers). No diffusers import
here: the producer must not need it.
"""

from __future__ import annotations

# Our canonical names and the AUTOMATIC1111 sampler label of each (written into PNG metadata).
SCHEDULER_LABELS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "pndm": "PNDM",
}

# The model's own scheduler: written as "default" (or left out, or null).
DEFAULT_SCHEDULER = "default"

KNOWN_SCHEDULERS: tuple[str, ...] = (DEFAULT_SCHEDULER, *SCHEDULER_LABELS)

# Both our snake_case names and the A1111 labels are accepted, case-insensitively.
_ALIASES: dict[str, str] = {
    **{name: name for name in SCHEDULER_LABELS},
    **{label.lower(): name for name, label in SCHEDULER_LABELS.items()},
}


def canonical_scheduler(name: str | None) -> str | None:
    """The canonical name of scheduler ``name``; None for the model's own.

    None, "" and "default" (any case) mean the model's own; "Euler a" and "EULER_A" both mean
    "euler_a". Raises ValueError, naming the known schedulers, for any other name.
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
