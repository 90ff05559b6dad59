"""Tiny, random SD3 and FLUX.1 pipelines for tests and offline smoke runs.

The components follow diffusers' own test fixtures (``get_dummy_components`` in
tests/pipelines/stable_diffusion_3/ and tests/pipelines/flux/), scaled so a 64x64 render
takes well under a second on CPU. Those fixtures download a tiny T5 and its tokenizer from
the Hub; here both are built in code: a T5 encoder with random weights and a character-level
Unigram tokenizer (the kind of model T5's sentencepiece vocabulary is) written as
``tokenizer.json``. Its vocabulary covers ASCII; other characters are ``<unk>`` (the tiny
model draws noise whatever the prompt). The CLIP tokenizers are the byte-level one of
:mod:`worker.tiny_model`.

Each folder also holds a tiny StableDiffusionSafetyChecker (``safety_checker/``) with its
image processor (``feature_extractor/``), which model_index.json does not list: neither
family ships a checker, and the worker runs this one as its own step after decoding
(:mod:`worker.safety`).
"""

from __future__ import annotations

import json
import pathlib
import string
import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from worker.tiny_model import (
    MODEL_MAX_LENGTH,
    CLIPImageProcessor,
    _tiny_safety_checker,
    build_tokenizer,
)

FAMILY_ARCHITECTURES = ("sd3", "flux", "flux-schnell")

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
# SD3 reads 256 T5 tokens by default, FLUX.1-dev 512: the tokenizer allows the longer one.
T5_MAX_LENGTH = 512
TINY_WIDTH = 32  # every text encoder's hidden size and the transformers' joint attention width


def t5_vocabulary() -> list[tuple[str, float]]:
    """T5's layout (<pad>=0, </s>=1, <unk>=2), then "▁" (a word start), every printable ASCII
    character with and without it. Scores favour word-initial pieces, as a trained model's do."""
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -2.0)]
    pieces += [("▁" + char, -3.0) for char in chars]
    pieces += [(char, -4.0) for char in chars]
    return pieces


def build_t5_tokenizer(work_dir: pathlib.Path, *, max_length: int = T5_MAX_LENGTH) -> Any:
    """A T5 (Unigram) tokenizer written to ``work_dir`` as tokenizer.json and loaded back
    with the tokenizers-backed T5 class (T5TokenizerFast in transformers 4, T5Tokenizer in 5),
    the class the released SD3 and FLUX folders name."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(Unigram(t5_vocabulary(), unk_id=2))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    # T5 ends every sequence with </s> and has no start token.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)]
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(work_dir / "tokenizer.json"))
    config = {
        "eos_token": T5_EOS,
        "unk_token": T5_UNK,
        "pad_token": T5_PAD,
        "extra_ids": 0,
        "model_max_length": max_length,
        "tokenizer_class": "T5Tokenizer",
    }
    (work_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(str(work_dir))


def _t5_encoder(tokenizer: Any, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _clip_encoder(tokenizer: CLIPTokenizer, seed: int, *, projection: bool) -> Any:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TINY_WIDTH,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=TINY_WIDTH,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


# Both families' VAEs have 16 latent channels; their inpainting pipelines insist on it.
LATENT_CHANNELS = 16


def _flow_vae(seed: int) -> AutoencoderKL:
    """The families' VAE layout (16 latent channels, no quant convs, a shift factor), an
    eighth of the image wide like the real ones, so sizes obey the same multiples."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=2,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_tiny_sd3_components(work_dir: pathlib.Path, *, seed: int = 0) -> dict[str, Any]:
    """SD3's three text encoders (two CLIP with projection, one T5), its MMDiT and VAE."""
    tokenizer = build_tokenizer(work_dir)
    t5_tokenizer = build_t5_tokenizer(work_dir / "t5")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=TINY_WIDTH,
        joint_attention_dim=TINY_WIDTH,
        pooled_projection_dim=2 * TINY_WIDTH,  # both CLIP projections, concatenated
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=64,  # latents up to 64x64: images up to 512x512
    )
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": _flow_vae(seed),
        "text_encoder": _clip_encoder(tokenizer, seed, projection=True),
        "tokenizer": tokenizer,
        "text_encoder_2": _clip_encoder(tokenizer, seed + 1, projection=True),
        "tokenizer_2": tokenizer,
        "text_encoder_3": _t5_encoder(t5_tokenizer, seed),
        "tokenizer_3": t5_tokenizer,
    }


def build_tiny_flux_components(
    work_dir: pathlib.Path, *, seed: int = 0, guidance_embeds: bool = True
) -> dict[str, Any]:
    """FLUX.1's CLIP and T5 encoders, its transformer and VAE. ``guidance_embeds``: dev (a
    guidance-distilled model that takes the guidance scale as an input) or schnell (no
    guidance input: a timestep-distilled model rendering in a few steps)."""
    tokenizer = build_tokenizer(work_dir)
    t5_tokenizer = build_t5_tokenizer(work_dir / "t5")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # latents packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_WIDTH,
        pooled_projection_dim=TINY_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    # FLUX.1-dev shifts its schedule by the image's size; schnell does not.
    scheduler = (
        FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        )
        if guidance_embeds
        else FlowMatchEulerDiscreteScheduler(shift=1.0)
    )
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": _flow_vae(seed),
        "text_encoder": _clip_encoder(tokenizer, seed, projection=False),
        "tokenizer": tokenizer,
        "text_encoder_2": _t5_encoder(t5_tokenizer, seed),
        "tokenizer_2": t5_tokenizer,
    }


def save_tiny_safety_checker(out_dir: pathlib.Path, tokenizer: CLIPTokenizer, seed: int) -> None:
    """A tiny StableDiffusionSafetyChecker and its image processor, in SD's folder layout."""
    _tiny_safety_checker(tokenizer, seed).save_pretrained(
        out_dir / "safety_checker", safe_serialization=True
    )
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    processor.save_pretrained(out_dir / "feature_extractor")


def build_tiny_family(out_dir: pathlib.Path, *, arch: str, seed: int = 0) -> pathlib.Path:
    """Write the tiny ``arch`` ("sd3", "flux" = FLUX.1-dev, "flux-schnell") as a diffusers
    folder at ``out_dir``, loadable offline with ``from_pretrained``. Returns ``out_dir``."""
    if arch not in FAMILY_ARCHITECTURES:
        known = ", ".join(FAMILY_ARCHITECTURES)
        raise ValueError(f"arch: unknown architecture {arch!r}; expected one of {known}")
    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="pixelmill-tokenizer-") as tmp:
        work_dir = pathlib.Path(tmp)
        pipe: Any
        if arch == "sd3":
            pipe = StableDiffusion3Pipeline(**build_tiny_sd3_components(work_dir, seed=seed))
        else:
            components = build_tiny_flux_components(
                work_dir, seed=seed, guidance_embeds=arch == "flux"
            )
            pipe = FluxPipeline(**components)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        save_tiny_safety_checker(out_dir, pipe.tokenizer, seed)
    return out_dir
