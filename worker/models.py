"""Resolving a job's model name to something ``from_pretrained`` can load."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pixelmill.settings import TINY_MODEL, Settings


def resolve_model(name: str, settings: Settings) -> str:
    """The built-in name ``tiny`` means the tiny random model in the data folder, built on
    first use (in code, nothing downloaded); ``null`` renders flat images with no model (to
    measure the system's own overhead). Anything else is a local folder, a single
    ``.safetensors`` checkpoint or a hub id."""
    if name != TINY_MODEL:
        return name
    target = settings.tiny_model_dir
    if not (target / "model_index.json").is_file():
        ensure_tiny_model(target)
    return str(target)


def ensure_tiny_model(target: Path) -> Path:
    from worker.tiny_model import build_tiny_pipeline

    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target, then rename: two workers starting at once never see a half-
    # written model, and the loser of the race just discards its copy.
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    try:
        build_tiny_pipeline(scratch / "model")
        try:
            os.rename(scratch / "model", target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
