"""pytest plugin: tiny random SD 1.x and SDXL pipelines on disk, built once per session.

Registered from the root conftest (``pytest_plugins = ["tests.model_fixtures"]``).
"""

from __future__ import annotations

import pathlib

import pytest

from worker.tiny_model import build_tiny_pipeline, build_tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A diffusers folder with a tiny random SD 1.x pipeline (built offline, ~9 MB)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A diffusers folder with a tiny random SDXL pipeline (built offline, ~4 MB)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl-model") / "tiny-sdxl")
