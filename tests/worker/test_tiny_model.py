from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import pytest

from worker.tiny_model import build_tiny, build_tiny_pipeline, build_tiny_sdxl_pipeline

UNET_WEIGHTS = pathlib.Path("unet") / "diffusion_pytorch_model.safetensors"


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_is_a_complete_sd_pipeline(tiny_model_dir: pathlib.Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for component in (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "safety_checker",
        "feature_extractor",
    ):
        assert index[component][0] is not None, component
    # safetensors only: nothing pickled.
    assert (tiny_model_dir / UNET_WEIGHTS).is_file()
    assert not list(tiny_model_dir.rglob("*.bin"))


def test_build_is_deterministic(tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path) -> None:
    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    assert _sha256(again / UNET_WEIGHTS) == _sha256(tiny_model_dir / UNET_WEIGHTS)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    assert _sha256(other / UNET_WEIGHTS) != _sha256(tiny_model_dir / UNET_WEIGHTS)


def test_tokenizer_covers_any_text(tiny_model_dir: pathlib.Path) -> None:
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    config = CLIPTextConfig.from_pretrained(tiny_model_dir / "text_encoder")
    assert tokenizer.model_max_length == 77
    ids = tokenizer("一只猫 on a mat, émigré").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    # Byte-level vocabulary: every byte has its own token, so nothing maps to <unk>
    # (which is the EOS token) except the final EOS itself.
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert max(ids) < config.vocab_size


# --- tiny SDXL ----------------------------------------------------------------------------


def _config(folder: pathlib.Path, component: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / component / "config.json").read_text())
    return config


def test_sdxl_folder_is_a_complete_sdxl_pipeline(tiny_sdxl_model_dir: pathlib.Path) -> None:
    index = json.loads((tiny_sdxl_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for component in (
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ):
        assert index[component][0] is not None, component
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    # SDXL ships no safety checker: the folder must not pretend to have one.
    assert "safety_checker" not in index
    assert (tiny_sdxl_model_dir / UNET_WEIGHTS).is_file()
    assert not list(tiny_sdxl_model_dir.rglob("*.bin"))


def test_sdxl_unet_is_conditioned_like_sdxl(tiny_sdxl_model_dir: pathlib.Path) -> None:
    unet = _config(tiny_sdxl_model_dir, "unet")
    encoder = _config(tiny_sdxl_model_dir, "text_encoder")
    encoder_2 = _config(tiny_sdxl_model_dir, "text_encoder_2")
    assert unet["addition_embed_type"] == "text_time"
    # Cross-attention sees both encoders' hidden states side by side ...
    assert unet["cross_attention_dim"] == encoder["hidden_size"] + encoder_2["hidden_size"]
    # ... and the added embedding six size/crop ids plus the second encoder's pooled output.
    assert unet["projection_class_embeddings_input_dim"] == (
        6 * unet["addition_time_embed_dim"] + encoder_2["projection_dim"]
    )
    # diffusers' single-file loader tells the two encoders apart by width (see tiny_model).
    assert encoder["hidden_size"] != encoder_2["hidden_size"]


def test_sdxl_build_is_deterministic(
    tmp_path: pathlib.Path, tiny_sdxl_model_dir: pathlib.Path
) -> None:
    again = build_tiny_sdxl_pipeline(tmp_path / "again", seed=0)
    for weights in (UNET_WEIGHTS, pathlib.Path("text_encoder_2") / "model.safetensors"):
        assert _sha256(again / weights) == _sha256(tiny_sdxl_model_dir / weights), weights
    other = build_tiny_sdxl_pipeline(tmp_path / "other", seed=1)
    assert _sha256(other / UNET_WEIGHTS) != _sha256(tiny_sdxl_model_dir / UNET_WEIGHTS)


def test_cli_writes_either_architecture(tmp_path: pathlib.Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    for arch, pipeline_class in (
        ("sdxl", "StableDiffusionXLPipeline"),
        ("sd", "StableDiffusionPipeline"),
    ):
        out = tmp_path / arch
        result = CliRunner().invoke(app, ["model", "tiny", "--out", str(out), "--arch", arch])
        assert result.exit_code == 0, result.output
        index = json.loads((out / "model_index.json").read_text())
        assert index["_class_name"] == pipeline_class


def test_cli_refuses_an_unknown_architecture(tmp_path: pathlib.Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["model", "tiny", "--out", str(out), "--arch", "sd4"])
    assert result.exit_code == 2
    assert "--arch" in result.output and "'sd4'" in result.output
    assert not out.exists()


def test_build_tiny_refuses_an_unknown_architecture(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="arch: unknown architecture 'flux2'"):
        build_tiny(tmp_path / "model", arch="flux2")
