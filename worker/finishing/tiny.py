"""The built-in tiny random upscaler and captioner (``tiny`` in PIXELMILL_UPSCALE_MODEL and
PIXELMILL_CAPTION_MODEL): built in code on first use into the data folder and saved like
real ones (an ESRGAN state dict in safetensors, a BLIP folder by ``save_pretrained``), so the
demo and the tests take the loading paths real models take, nothing downloaded. Their
output is noise and nonsense words: they show the plumbing, not the quality."""

from __future__ import annotations

import os
import pathlib
import tempfile

import torch

from pixelmill.settings import TINY_MODEL, Settings
from worker.finishing.caption import quiet_progress
from worker.finishing.upscale import import_spandrel
from worker.models import build_atomically

TINY_UPSCALER_FILE = "tiny-upscaler-x4.safetensors"
TINY_CAPTIONER_DIR = "tiny-captioner"

# The tiny BLIP's vocabulary: BERT's special tokens, BLIP's decoder start, letters, and a few
# words of product photos, so its (random) captions read as words.
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_WORDS = [
    *("a", "an", "the", "of", "on", "in", "with", "and", "photo", "product", "studio"),
    *("white", "background", "table", "wooden", "brass", "lamp", "chair", "shoe", "bag"),
    *("bottle", "mug", "red", "blue", "green", "black", "grey", "soft", "light", "shadow"),
]


def build_tiny_upscaler(path: pathlib.Path, *, scale: int = 4, seed: int = 0) -> pathlib.Path:
    """A tiny random ESRGAN (spandrel's RRDBNet: 8 filters, one block) saved at ``path`` as
    a safetensors state dict."""
    from safetensors.torch import save_file

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def build_tiny_captioner(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """A tiny random BLIP captioner (2-layer ViT and text decoder, 32 wide) with a BERT
    word-piece tokenizer and PIL image processor, saved at ``out_dir``."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    vocab = {token: i for i, token in enumerate(_SPECIAL + list("abcdefghijklmnopqrstuvwxyz"))}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    config = BlipConfig(
        text_config={
            **layers,
            "num_hidden_layers": 2,
            "vocab_size": len(tokenizer),
            "encoder_hidden_size": 32,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**layers, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    with quiet_progress():
        BlipForConditionalGeneration(config).save_pretrained(out_dir, safe_serialization=True)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def _models_dir(settings: Settings) -> pathlib.Path:
    return settings.tiny_model_dir.parent


def resolve_upscale_model(settings: Settings) -> pathlib.Path | None:
    """The configured upscale model file (None: no upscaling); ``tiny`` is built on first use."""
    if not settings.upscale_model:
        return None
    if settings.upscale_model != TINY_MODEL:
        return pathlib.Path(settings.upscale_model).expanduser()
    target = _models_dir(settings) / TINY_UPSCALER_FILE
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written beside it, then renamed: two workers starting at once never read half a file.
        fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=".tiny-", suffix=".safetensors")
        os.close(fd)
        try:
            build_tiny_upscaler(pathlib.Path(scratch))
            os.replace(scratch, target)
        finally:
            pathlib.Path(scratch).unlink(missing_ok=True)
    return target


def resolve_caption_model(settings: Settings) -> str | None:
    """The configured caption model (None: no captions); ``tiny`` is built on first use."""
    if not settings.caption_model:
        return None
    if settings.caption_model != TINY_MODEL:
        return settings.caption_model
    target = _models_dir(settings) / TINY_CAPTIONER_DIR
    if not (target / "config.json").is_file():
        build_atomically(target, "config.json", build_tiny_captioner)
    return str(target)
