"""Where approved images live in storage: the review export's copies and what finishing makes
from them, under one prefix, at keys that follow from what they were made from."""

from __future__ import annotations

from pathlib import PurePosixPath

APPROVED_PREFIX = "approved/"


def approved_key(storage_key: str) -> str:
    """The review export's copy of a kept image."""
    return APPROVED_PREFIX + storage_key


def upscaled_key(storage_key: str, *, scale: int, model_sha256: str) -> str:
    """The upscaled copy of a kept image, beside its approved copy: the same image, scale and
    upscaler always give the same key (``approved/runs/3/jobs/17/1234.x4-0123456789ab.png``),
    another upscaler another one."""
    path = PurePosixPath(approved_key(storage_key))
    return str(path.with_name(f"{path.stem}.x{scale}-{model_sha256[:12]}.png"))
