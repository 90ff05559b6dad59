"""Single-file checkpoints (the original LDM / AUTOMATIC1111 layout) through load_pipeline.

The checkpoints are the tiny models converted by tests/worker/checkpoints.py. They are
loaded against a copy of the tiny folder *without weights* (what PIXELMILL_MODEL_CONFIG
points at in production): given a folder with weights, diffusers would quietly take any
component missing from the checkpoint from there, and these tests could not notice.
"""

from __future__ import annotations

import pathlib

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.worker.checkpoints import (
    SD_TEXT_ENCODER_PREFIX,
    SDXL_TEXT_ENCODER_2_PREFIX,
    SDXL_TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    convert_to_single_file,
    copy_configs_only,
)
from worker.loading import load_pipeline
from worker.pipeline import RenderParams, render_batch

CPU = torch.device("cpu")
PARAMS = RenderParams(
    prompt="a red bicycle against a brick wall",
    negative_prompt="blurry",
    steps=3,
    guidance=6.0,
    width=64,
    height=64,
)
SEEDS = [11, 12]


def _keys(checkpoint: pathlib.Path) -> list[str]:
    with safe_open(str(checkpoint), framework="pt") as handle:
        return list(handle.keys())


def _numel(files: list[pathlib.Path]) -> int:
    return sum(tensor.numel() for file in files for tensor in load_file(file).values())


def _pixels(images: list[object]) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


@pytest.fixture(scope="module")
def sd_checkpoint(
    tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    out = tmp_path_factory.mktemp("single-file") / "tiny-sd.safetensors"
    return convert_to_single_file(tiny_model_dir, out)


@pytest.fixture(scope="module")
def sd_config_dir(
    tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    return copy_configs_only(tiny_model_dir, tmp_path_factory.mktemp("config") / "tiny-sd")


@pytest.fixture(scope="module")
def sdxl_checkpoint(
    tiny_sdxl_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    out = tmp_path_factory.mktemp("single-file") / "tiny-sdxl.safetensors"
    return convert_to_single_file(tiny_sdxl_model_dir, out)


@pytest.fixture(scope="module")
def sdxl_config_dir(
    tiny_sdxl_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> pathlib.Path:
    return copy_configs_only(tiny_sdxl_model_dir, tmp_path_factory.mktemp("config") / "tiny-sdxl")


# --- the converted files ------------------------------------------------------------------


def test_sd_checkpoint_has_the_original_layout(
    sd_checkpoint: pathlib.Path, tiny_model_dir: pathlib.Path
) -> None:
    keys = _keys(sd_checkpoint)
    prefixes = (UNET_PREFIX, VAE_PREFIX, SD_TEXT_ENCODER_PREFIX)
    assert [key for key in keys if not key.startswith(prefixes)] == []
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",  # conv_in
        "model.diffusion_model.middle_block.1.proj_in.weight",  # the mid attention
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # upsampler after attention
        "first_stage_model.decoder.up.1.upsample.conv.weight",  # decoder levels bottom-up
        "first_stage_model.encoder.mid.attn_1.q.weight",
        # diffusers recognises SD 1.x's text encoder by this key.
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in keys, key
    # Nothing lost, nothing invented: the same number of weights as the folder's components.
    components = [
        tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors",
        tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors",
        tiny_model_dir / "text_encoder" / "model.safetensors",
    ]
    assert _numel([sd_checkpoint]) == _numel(components)


def test_sdxl_checkpoint_has_the_original_layout(
    sdxl_checkpoint: pathlib.Path, tiny_sdxl_model_dir: pathlib.Path
) -> None:
    keys = _keys(sdxl_checkpoint)
    prefixes = (UNET_PREFIX, VAE_PREFIX, SDXL_TEXT_ENCODER_PREFIX, SDXL_TEXT_ENCODER_2_PREFIX)
    assert [key for key in keys if not key.startswith(prefixes)] == []
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",  # SDXL's size/pooled-text embedding
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    ):
        assert key in keys, key
    components = [
        tiny_sdxl_model_dir / "unet" / "diffusion_pytorch_model.safetensors",
        tiny_sdxl_model_dir / "vae" / "diffusion_pytorch_model.safetensors",
        tiny_sdxl_model_dir / "text_encoder" / "model.safetensors",
        tiny_sdxl_model_dir / "text_encoder_2" / "model.safetensors",
    ]
    assert _numel([sdxl_checkpoint]) == _numel(components)


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_diffusers_reads_every_weight_back(arch: str, request: pytest.FixtureRequest) -> None:
    """diffusers' own single-file loader turns the checkpoint back into the folder's weights."""
    from diffusers import AutoPipelineForText2Image
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )

    folder: pathlib.Path = request.getfixturevalue(
        "tiny_model_dir" if arch == "sd" else "tiny_sdxl_model_dir"
    )
    checkpoint: pathlib.Path = request.getfixturevalue(f"{arch}_checkpoint")
    config_dir: pathlib.Path = request.getfixturevalue(f"{arch}_config_dir")
    pipeline_class = StableDiffusionPipeline if arch == "sd" else StableDiffusionXLPipeline
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])

    original = AutoPipelineForText2Image.from_pretrained(str(folder), local_files_only=True)
    loaded = pipeline_class.from_single_file(
        str(checkpoint), config=str(config_dir), local_files_only=True
    )
    for component in components:
        expected = getattr(original, component).state_dict()
        actual = getattr(loaded, component).state_dict()
        assert sorted(actual) == sorted(expected), component
        differing = [key for key in expected if not torch.equal(actual[key], expected[key])]
        assert differing == [], f"{component}: {differing[:5]}"


# --- through load_pipeline ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "pipeline_class", "max_difference"),
    [
        ("sd", "StableDiffusionPipeline", 0),
        # SDXL: at most one rounding step in a rare pixel. The weights are bit-identical
        # (test_diffusers_reads_every_weight_back), but transformers maps the folder's text
        # encoders straight from the safetensors file, at addresses that are not 64-byte
        # aligned, while the single-file loader copies them into fresh aligned memory; CPU
        # matmul kernels round differently for the two, and the pooled projection of the
        # second text encoder picks up a 1e-7 difference.
        ("sdxl", "StableDiffusionXLPipeline", 1),
    ],
)
def test_single_file_renders_the_folders_pixels(
    arch: str, pipeline_class: str, max_difference: int, request: pytest.FixtureRequest
) -> None:
    folder: pathlib.Path = request.getfixturevalue(
        "tiny_model_dir" if arch == "sd" else "tiny_sdxl_model_dir"
    )
    checkpoint: pathlib.Path = request.getfixturevalue(f"{arch}_checkpoint")
    config_dir: pathlib.Path = request.getfixturevalue(f"{arch}_config_dir")

    from_file = load_pipeline(str(checkpoint), device=CPU, config=str(config_dir))
    from_folder = load_pipeline(str(folder), device=CPU)
    assert type(from_file).__name__ == pipeline_class

    rendered = render_batch(from_file, PARAMS, SEEDS)
    expected = render_batch(from_folder, PARAMS, SEEDS)
    assert [image.seed for image in rendered] == SEEDS
    assert all(image.image.size == (PARAMS.width, PARAMS.height) for image in rendered)
    for seed, actual, wanted in zip(
        SEEDS,
        _pixels([r.image for r in rendered]),
        _pixels([e.image for e in expected]),
        strict=True,
    ):
        assert int(np.abs(actual - wanted).max()) <= max_difference, f"seed {seed}"
    # Not a constant image: equal pixels above mean equal weights, not two blank renders.
    assert float(_pixels([rendered[0].image])[0].std()) > 5


# --- refusals -----------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No model config from the environment, and the Hub unreachable by configuration.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the switch is set on its
    constants module: a load that would fall back to the Hub fails at once instead of
    waiting on the network.
    """
    monkeypatch.delenv("PIXELMILL_MODEL_CONFIG", raising=False)
    monkeypatch.delenv("PIXELMILL_MODEL_CONFIG_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
def test_a_checkpoint_without_config_is_refused_with_the_fix(sd_checkpoint: pathlib.Path) -> None:
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_pipeline(str(sd_checkpoint), device=CPU)
    message = str(info.value)
    assert str(sd_checkpoint) in message
    assert "PIXELMILL_MODEL_CONFIG" in message  # what to set, not just what went wrong


def _garbage(path: pathlib.Path, _folder: pathlib.Path) -> None:
    path.write_bytes(b"these are not tensors\n" * 10)


def _empty(path: pathlib.Path, _folder: pathlib.Path) -> None:
    path.write_bytes(b"")


def _diffusers_component(path: pathlib.Path, folder: pathlib.Path) -> None:
    # Real safetensors, real weights, but one diffusers component: not a checkpoint.
    path.write_bytes((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("make", [_garbage, _empty, _diffusers_component])
def test_a_file_that_is_no_checkpoint_is_refused(
    make: object,
    tmp_path: pathlib.Path,
    tiny_model_dir: pathlib.Path,
    sd_config_dir: pathlib.Path,
) -> None:
    path = tmp_path / "model.safetensors"
    assert callable(make)
    make(path, tiny_model_dir)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_pipeline(str(path), device=CPU, config=str(sd_config_dir))
    assert str(path) in str(info.value)


@pytest.mark.usefixtures("offline")
def test_a_pickled_ckpt_is_refused(
    tiny_model_dir: pathlib.Path, sd_config_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # A genuine checkpoint, but a pickle: loading one can run arbitrary code.
    checkpoint = convert_to_single_file(tiny_model_dir, tmp_path / "tiny-sd.ckpt")
    with pytest.raises(ValueError) as info:
        load_pipeline(str(checkpoint), device=CPU, config=str(sd_config_dir))
    assert str(checkpoint) in str(info.value)
    assert ".safetensors" in str(info.value)
