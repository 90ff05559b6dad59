"""A full-size CLIP ViT-L/14 scorer with random weights, for timing render-time scoring on a
GPU without a download: the architecture of openai/clip-vit-large-patch14 (the encoder of
the LAION aesthetic predictor), its tokenizer built in code, and a random LAION-layout
aesthetic head beside it. Its scores mean nothing; its cost is the real one's."""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from worker.scoring.aesthetic import random_aesthetic_head
from worker.scoring.tiny import HEAD_FILE
from worker.synthetic_model import CLIP_VIT_L_TEXT, _default_dtype, check_output_folder
from worker.tiny_model import build_tokenizer

SCORER_ARCH = "clip-vit-l14"
# openai/clip-vit-large-patch14's vision tower (24 layers of 1024 on 14-pixel patches of a
# 224-pixel image) and projection; its text tower is SD 1.5's text encoder.
CLIP_VIT_L14_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
}
PROJECTION_DIM = 768


def vit_l14_config(tokenizer: Any = None) -> CLIPConfig:
    """The ViT-L/14 CLIP config; with ``tokenizer``, its special token ids."""
    text = dict(CLIP_VIT_L_TEXT)
    if tokenizer is not None:
        text.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return CLIPConfig(
        text_config=text, vision_config=CLIP_VIT_L14_VISION, projection_dim=PROJECTION_DIM
    )


def scorer_parameter_count(config: CLIPConfig | None = None) -> int:
    """Parameters of the CLIP model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = CLIPModel(config or vit_l14_config())
    return sum(parameter.numel() for parameter in model.parameters())


def build_synthetic_scorer(
    out_dir: pathlib.Path,
    *,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    config: CLIPConfig | None = None,
) -> pathlib.Path:
    """Write the random scorer (``config``: another CLIP architecture, for tests) at
    ``out_dir``, loadable with ``PIXELMILL_SCORER=out_dir`` (the head: its
    ``aesthetic_head.safetensors``, for ``PIXELMILL_AESTHETIC_HEAD``)."""
    out_dir = pathlib.Path(out_dir)
    itemsize = torch.empty((), dtype=dtype).element_size()
    check_output_folder(out_dir, needed_bytes=scorer_parameter_count(config) * itemsize)
    with tempfile.TemporaryDirectory(prefix="pixelmill-tokenizer-") as tmp:
        tokenizer = build_tokenizer(pathlib.Path(tmp))
        chosen = config or vit_l14_config(tokenizer)
        torch.manual_seed(seed)
        with _default_dtype(dtype), torch.no_grad():
            model = CLIPModel(chosen)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    projection = int(chosen.projection_dim or PROJECTION_DIM)
    save_file(random_aesthetic_head(projection, seed=seed), str(out_dir / HEAD_FILE))
    return out_dir
