"""What identifies a job and an item, for every part that makes or re-makes them.

The producer creates jobs and review re-rolls them; both must compute the same dedupe key
(everything that determines a job's pixels) and the same content hash of an item's fields,
so the definitions live here, below both.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from db.job_options import JobOptions
from db.models import JobKind


def fields_json(fields: dict[str, str]) -> str:
    """An item's fields as canonical JSON (sorted keys): what its content hash covers."""
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def content_hash(fields: dict[str, str]) -> str:
    return hashlib.sha256(fields_json(fields).encode("utf-8")).hexdigest()


def length_prefixed(part: str) -> str:
    # Length-prefixed parts: unambiguous whatever characters the prompts contain.
    return f"{len(part)}:{part}"


def settings_parts(
    model: str, scheduler: str | None, steps: int, guidance: float, width: int, height: int
) -> str:
    parts = (model, str(scheduler), str(steps), repr(float(guidance)), str(width), str(height))
    return "".join(map(length_prefixed, parts))


def conditioning_parts(
    kind: str, input_image: str | None, mask_image: str | None, options: str
) -> str:
    """What the dedupe key covers beyond the prompt: the kind, the staged images' hashes and
    the options' canonical JSON (``options``: :meth:`JobOptions.canonical`).

    Nothing for a plain txt2img job (no images, no options), so its key is the one it had
    before job kinds existed and earlier runs' jobs still match.
    """
    if kind == JobKind.TXT2IMG and input_image is None and mask_image is None and not options:
        return ""
    return "".join(map(length_prefixed, (kind, input_image or "", mask_image or "", options)))


def dedupe_key(job: dict[str, Any], salt: str = "") -> str:
    """Hash of everything that determines a job's pixels (plus ``salt`` for forced renders).

    ``job`` holds the jobs table's columns (``kind``, ``input_image``, ``mask_image`` and
    ``options`` may be left out for a plain txt2img job). The reference definition; the
    producer computes the same value in producer.plan and producer.expansion (the
    settings hashed once per template variant).
    """
    encoded = (
        settings_parts(
            job["model"],
            job["scheduler"],
            job["steps"],
            job["guidance"],
            job["width"],
            job["height"],
        )
        + "".join(
            map(
                length_prefixed,
                (job["prompt"], job["negative_prompt"], ",".join(map(str, job["seeds"])), salt),
            )
        )
        + conditioning_parts(
            job.get("kind") or JobKind.TXT2IMG.value,
            job.get("input_image"),
            job.get("mask_image"),
            JobOptions.from_json(job.get("options")).canonical(),
        )
    )
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()
