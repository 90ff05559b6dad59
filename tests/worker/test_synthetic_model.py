"""The synthetic SD 1.5 / SDXL pipelines have the released architectures, exactly.

Parameters are counted on the meta device (no memory, about a second). Writing and loading a
full-size folder (2 GB for SD 1.5 in fp16) and rendering with it is the GPU test at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from worker.synthetic_model import (
    SD15_UNET,
    SDXL_UNET,
    build_models,
    check_output_folder,
    parameter_counts,
    parse_dtype,
)

# Parameter counts of the released checkpoints' models (as diffusers/transformers count them).
SD15_PARAMETERS = {
    "unet": 859_520_964,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,  # CLIP ViT-L/14 text tower
}
SDXL_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,  # CLIP ViT-L/14 text tower
    "text_encoder_2": 694_659_840,  # OpenCLIP ViT-bigG/14 text tower with projection
}


def test_sd15_has_the_released_parameter_counts() -> None:
    assert parameter_counts("sd15") == SD15_PARAMETERS


def test_sdxl_has_the_released_parameter_counts() -> None:
    assert parameter_counts("sdxl") == SDXL_PARAMETERS


def test_model_configs_are_the_released_ones() -> None:
    with torch.device("meta"):
        sd15 = build_models("sd15")
        sdxl = build_models("sdxl")
    assert sd15["unet"].config.cross_attention_dim == 768
    assert list(sd15["unet"].config.block_out_channels) == [320, 640, 1280, 1280]
    assert sd15["text_encoder"].config.hidden_act == "quick_gelu"
    assert sdxl["unet"].config.addition_embed_type == "text_time"
    assert sdxl["unet"].config.cross_attention_dim == 2048  # 768 + 1280, both encoders
    assert list(sdxl["unet"].config.transformer_layers_per_block) == [1, 2, 10]
    assert sdxl["text_encoder_2"].config.projection_dim == 1280
    assert sdxl["vae"].config.scaling_factor == 0.13025
    # Latents are an eighth of the image: 512 px for SD 1.5, 1024 px for SDXL by default.
    assert (SD15_UNET["sample_size"], SDXL_UNET["sample_size"]) == (64, 128)


def test_unknown_architecture_and_dtype_are_named() -> None:
    with pytest.raises(ValueError, match=r"--arch: unknown architecture 'sd3'"):
        build_models("sd3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"--dtype: unknown dtype 'fp8'; known: fp16, bf16, fp32"):
        parse_dtype("fp8")
    assert parse_dtype("fp16") is torch.float16


def test_refuses_a_non_empty_folder_and_a_full_disk(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        check_output_folder(tmp_path / "used", needed_bytes=1)
    with pytest.raises(OSError, match=r"needs about 1000000\.0 GB, only .* GB free"):
        check_output_folder(tmp_path / "new" / "model", needed_bytes=10**15)
    check_output_folder(tmp_path / "new" / "model", needed_bytes=1000)  # room enough


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "sd2"], "--arch: unknown architecture 'sd2'"),
        (["--arch", "sd15", "--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
    ],
)
def test_cli_names_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["model", "synthetic", *args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.gpu
def test_cli_writes_an_sd15_folder_that_renders_on_the_gpu(tmp_path: Path) -> None:
    """End to end on a GPU: `pixelmill model synthetic` -> from_pretrained -> a 512x512 image."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from worker.loading import load_pipeline
    from worker.pipeline import RenderParams, render_seed

    out = tmp_path / "sd15"
    result = CliRunner().invoke(app, ["model", "synthetic", "--arch", "sd15", "--out", str(out)])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]

    pipe = load_pipeline(str(out), device=torch.device("cuda"))
    counted = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in SD15_PARAMETERS
    }
    assert counted == SD15_PARAMETERS
    params = RenderParams(
        prompt="a red sneaker", negative_prompt="", steps=2, guidance=7.0, width=512, height=512
    )
    rendered = render_seed(pipe, params, seed=1)
    assert rendered.image.size == (512, 512)
