"""The built-in tiny random scorer: a small CLIP and aesthetic head built in code and saved
like a real one (``CLIPModel.save_pretrained``, a safetensors head), so the demo and the
tests score images through the same loading path a real scorer takes, nothing downloaded."""

from __future__ import annotations

import pathlib
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPModel
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from pixelmill.settings import TINY_MODEL, Settings
from worker.models import build_atomically
from worker.scoring.aesthetic import random_aesthetic_head
from worker.scoring.scorer import CLIP_MEAN, CLIP_STD
from worker.tiny_model import MODEL_MAX_LENGTH, build_tokenizer

HEAD_FILE = "aesthetic_head.safetensors"
PROJECTION_DIM = 32
IMAGE_SIZE = 32


def build_tiny_scorer(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """A tiny random CLIP (ViT and text transformer, 32-value embeddings) with its tokenizer,
    and a random LAION-layout aesthetic head beside it, saved at ``out_dir``."""
    from transformers import CLIPConfig

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
                "image_size": IMAGE_SIZE,
                "patch_size": 4,
            },
            projection_dim=PROJECTION_DIM,
        )
        torch.manual_seed(seed)
        model = CLIPModel(config)
        _spread_image_embeddings(model, seed=seed)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    save_file(random_aesthetic_head(PROJECTION_DIM, seed=seed), str(out_dir / HEAD_FILE))
    return out_dir


def _spread_image_embeddings(model: CLIPModel, *, seed: int) -> None:
    """Make the random CLIP's image embedding depend on the pixels.

    The image embedding is the class token after the transformer. With random weights
    attention is near uniform and the class token's own (constant) embedding dominates the
    residual stream, so every image lands within a few degrees of every other (cosine
    0.93-0.999) and any near-duplicate threshold groups an item's renders together. Two
    changes fix that: the class token starts empty (its embedding and position zeroed), so
    it carries only what attention gathers from the patches; and the final layer norm is
    centred on noise images, the kind a random-weight renderer makes, so the part every
    image shares is taken out of the embedding. Distinct tiny-model renders then lie at
    cosine about 0.7 from one another (none above 0.96 in the demo) while a copy with one
    8-bit level of noise stays above 0.999.
    """
    vision = model.vision_model
    embeddings: CLIPVisionEmbeddings = vision.embeddings
    size = IMAGE_SIZE
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(64, 3, 2 * size, 2 * size, generator=generator)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    # Resized as the scorer resizes every render (see Scorer.image_embeddings).
    resized = F.interpolate(noise, size=(size, size), mode="bicubic", antialias=True)
    with torch.no_grad():
        embeddings.class_embedding.zero_()
        embeddings.position_embedding.weight[0].zero_()
        pooled = vision(pixel_values=(resized.clamp(0, 1) - mean) / std).pooler_output
        vision.post_layernorm.bias -= pooled.mean(dim=0)


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
