"""pytest plugin: tiny random SD 1.x and SDXL pipelines on disk, built once per session, and
tiny adapters for them (ControlNet, LoRA, Textual Inversion embedding).

Registered from the root conftest (``pytest_plugins = ["tests.model_fixtures"]``).
"""

from __future__ import annotations

import pathlib

import pytest

from worker.tiny_adapters import build_tiny_controlnet, build_tiny_embedding, build_tiny_lora
from worker.tiny_model import build_tiny_pipeline, build_tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A diffusers folder with a tiny random SD 1.x pipeline (built offline, ~9 MB)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A diffusers folder with a tiny random SDXL pipeline (built offline, ~4 MB)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl-model") / "tiny-sdxl")


# --- adapters for the tiny pipelines (worker.tiny_adapters) -----------------------------------
# A ControlNet is a diffusers folder (ControlNetSpec.model); a LoRA and an embedding are one
# .safetensors file each (LoraRef.path, EmbeddingRef.path; the embedding's token is
# worker.tiny_adapters.TINY_EMBEDDING_TOKEN by convention, any unused token works).


@pytest.fixture(scope="session")
def tiny_controlnet_dir(
    tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A diffusers ControlNet folder for the tiny SD pipeline (~3 MB)."""
    return build_tiny_controlnet(tiny_model_dir, tmp_path_factory.mktemp("tiny-controlnet") / "cn")


@pytest.fixture(scope="session")
def tiny_sdxl_controlnet_dir(
    tiny_sdxl_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A diffusers ControlNet folder for the tiny SDXL pipeline."""
    out = tmp_path_factory.mktemp("tiny-sdxl-controlnet") / "cn"
    return build_tiny_controlnet(tiny_sdxl_model_dir, out)


@pytest.fixture(scope="session")
def tiny_lora_path(
    tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A UNet LoRA (.safetensors) for the tiny SD pipeline; it changes the rendered pixels."""
    out = tmp_path_factory.mktemp("tiny-lora") / "tiny-lora.safetensors"
    return build_tiny_lora(tiny_model_dir, out)


@pytest.fixture(scope="session")
def tiny_sdxl_lora_path(
    tiny_sdxl_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A UNet LoRA (.safetensors) for the tiny SDXL pipeline."""
    out = tmp_path_factory.mktemp("tiny-sdxl-lora") / "tiny-sdxl-lora.safetensors"
    return build_tiny_lora(tiny_sdxl_model_dir, out)


@pytest.fixture(scope="session")
def tiny_embedding_path(
    tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A one-vector Textual Inversion embedding (.safetensors, ``emb_params``) for tiny SD."""
    out = tmp_path_factory.mktemp("tiny-embedding") / "tiny-embedding.safetensors"
    return build_tiny_embedding(tiny_model_dir, out)


@pytest.fixture(scope="session")
def tiny_sdxl_embedding_path(
    tiny_sdxl_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    """A Textual Inversion embedding (``clip_l`` + ``clip_g``) for the tiny SDXL pipeline."""
    out = tmp_path_factory.mktemp("tiny-sdxl-embedding") / "tiny-sdxl-embedding.safetensors"
    return build_tiny_embedding(tiny_sdxl_model_dir, out)
