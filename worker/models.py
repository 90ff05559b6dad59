"""Resolving a job's model name to something ``from_pretrained`` can load."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pixelmill.settings import TINY_CONTROLNET, TINY_MODEL, Settings


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


def resolve_controlnet(name: str, settings: Settings) -> str:
    """The built-in name ``tiny-controlnet`` means a tiny random ControlNet for the tiny
    model, built on first use next to it; anything else is a local folder or a hub id."""
    if name != TINY_CONTROLNET:
        return name
    from worker.tiny_adapters import build_tiny_controlnet

    target = settings.tiny_model_dir.parent / TINY_CONTROLNET
    if not (target / "config.json").is_file():
        tiny = ensure_tiny_model(settings.tiny_model_dir)
        build_atomically(target, "config.json", lambda out: build_tiny_controlnet(tiny, out))
    return str(target)


def ensure_tiny_model(target: Path) -> Path:
    from worker.tiny_model import build_tiny_pipeline

    if not (target / "model_index.json").is_file():
        build_atomically(target, "model_index.json", build_tiny_pipeline)
    return target


def build_atomically(target: Path, marker: str, build: Callable[[Path], object]) -> None:
    """Build next to ``target``, then rename: two workers starting at once never see a half-
    written model, and the loser of the race just discards its copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    try:
        build(scratch / "model")
        try:
            os.rename(scratch / "model", target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
