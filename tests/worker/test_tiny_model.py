from __future__ import annotations

import hashlib
import json
import pathlib

from worker.tiny_model import build_tiny_pipeline

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
