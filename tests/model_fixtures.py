"""pytest plugin: a tiny random Stable Diffusion pipeline on disk, built once per session.

Registered from the root conftest (``pytest_plugins = ["tests.model_fixtures"]``).
"""

from __future__ import annotations

import pathlib

import pytest

from worker.tiny_model import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A diffusers folder with a tiny random SD 1.x pipeline (built offline, ~9 MB)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")
