"""The built-in tiny random scorer: a small CLIP and aesthetic head built in code and saved
like a real one (``CLIPModel.save_pretrained``, a safetensors head), so the demo and the
tests score images through the same loading path a real scorer takes, nothing downloaded."""

from __future__ import annotations

import pathlib
import tempfile

import torch
from safetensors.torch import save_file

from pixelmill.settings import TINY_MODEL, Settings
from worker.models import build_atomically
from worker.scoring.aesthetic import random_aesthetic_head
from worker.tiny_model import MODEL_MAX_LENGTH, build_tokenizer

HEAD_FILE = "aesthetic_head.safetensors"
PROJECTION_DIM = 32


def build_tiny_scorer(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """A tiny random CLIP (ViT and text transformer, 32-value embeddings) with its tokenizer,
    and a random LAION-layout aesthetic head beside it, saved at ``out_dir``."""
    from transformers import CLIPConfig, CLIPModel

    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="pixelmill-tokenizer-") as tmp:
        tokenizer = build_tokenizer(pathlib.Path(tmp))
        config = CLIPConfig(
            text_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": MODEL_MAX_LENGTH,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "image_size": 32,
                "patch_size": 4,
            },
            projection_dim=PROJECTION_DIM,
        )
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    save_file(random_aesthetic_head(PROJECTION_DIM, seed=seed), str(out_dir / HEAD_FILE))
    return out_dir


def resolve_scorer(settings: Settings) -> tuple[str, pathlib.Path | None] | None:
    """The configured scorer and aesthetic head (None: nothing is scored). ``tiny`` is the
    built-in tiny random scorer, built on first use in the data folder, with its own head
    unless another is configured."""
    if not settings.scorer:
        return None
    if settings.scorer != TINY_MODEL:
        return settings.scorer, settings.aesthetic_head
    target = settings.tiny_model_dir.parent / "tiny-scorer"
    if not (target / HEAD_FILE).is_file():
        build_atomically(target, HEAD_FILE, build_tiny_scorer)
    return str(target), settings.aesthetic_head or target / HEAD_FILE
