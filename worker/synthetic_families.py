"""Full-size SD3.5 and FLUX.1 pipelines with random weights, built offline.

The configs are those published with stabilityai/stable-diffusion-3.5-large and -medium and
black-forest-labs/FLUX.1-dev and -schnell (transformer, VAE, scheduler; the CLIP ViT-L,
OpenCLIP bigG and T5-XXL text encoders, google/t5-v1_1-xxl's encoder), so a synthetic folder
costs the GPU time and memory per image the real model does and loads through the same
``from_pretrained`` path. Only the weights are random: it draws noise.

The tokenizers are built in code (the byte-level CLIP tokenizer of :mod:`worker.tiny_model`,
the character-level T5 tokenizer of :mod:`worker.tiny_families`); the encoders keep the real
vocabulary sizes, so their size is the real one, and every id of the small vocabularies falls
inside the tables.

The models are written one at a time and freed, so building needs memory for the largest one
only (FLUX.1's transformer: 24 GB in bf16), and disk for all of them (about 34 GB for FLUX.1
in bf16, 27 GB for SD3.5 Large): the free space is checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import gc
import pathlib
import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

FAMILY_ARCHES = ("sd35", "sd35-medium", "flux-dev", "flux-schnell")

T5_VOCAB_SIZE = 32128  # T5's sentencepiece vocabulary, with its 100 sentinel ids

# google/t5-v1_1-xxl's encoder: SD3's third and FLUX.1's second text encoder.
T5_XXL: dict[str, Any] = {
    "vocab_size": T5_VOCAB_SIZE,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-06,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

_FLOW_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
SD3_VAE: dict[str, Any] = {**_FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE: dict[str, Any] = {**_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

SD35_LARGE: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,  # CLIP-L's 768 + bigG's 1280 pooled projections
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "dual_attention_layers": (),
}
SD35_MEDIUM: dict[str, Any] = {
    **SD35_LARGE,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
}
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_SCHNELL: dict[str, Any] = {**FLUX_DEV, "guidance_embeds": False}

SD35_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
FLUX_SCHNELL_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


@dataclasses.dataclass(frozen=True)
class FamilyArch:
    """One release's architecture: which pipeline, and every model's config."""

    family: str  # "sd3" or "flux"
    transformer: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    t5: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(T5_XXL))
    # CLIP text towers (worker.synthetic_model's configs): SD3 has two, with projections.
    clip: tuple[dict[str, Any], ...] = ()


def family_arch(arch: str) -> FamilyArch:
    from worker.synthetic_model import CLIP_BIGG_TEXT, CLIP_VIT_L_TEXT

    if arch in ("sd35", "sd35-medium"):
        transformer = SD35_LARGE if arch == "sd35" else SD35_MEDIUM
        return FamilyArch(
            "sd3", transformer, SD3_VAE, SD35_SCHEDULER, clip=(CLIP_VIT_L_TEXT, CLIP_BIGG_TEXT)
        )
    if arch in ("flux-dev", "flux-schnell"):
        dev = arch == "flux-dev"
        return FamilyArch(
            "flux",
            FLUX_DEV if dev else FLUX_SCHNELL,
            FLUX_VAE,
            FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER,
            clip=(CLIP_VIT_L_TEXT,),
        )
    raise ValueError(f"--arch: unknown architecture {arch!r}; known: {', '.join(FAMILY_ARCHES)}")


def _text_encoder_names(spec: FamilyArch) -> list[str]:
    """Pipeline component names of the CLIP encoders, then T5's."""
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    return names[: len(spec.clip) + 1]


def model_builders(spec: FamilyArch, tokenizer: CLIPTokenizer | None = None) -> dict[str, Any]:
    """Each neural network of ``spec`` as a function building it (on the current default
    device and dtype), by pipeline component name."""
    from worker.synthetic_model import text_config

    transformer_class = SD3Transformer2DModel if spec.family == "sd3" else FluxTransformer2DModel
    clip_class = CLIPTextModelWithProjection if spec.family == "sd3" else CLIPTextModel
    builders: dict[str, Any] = {
        "transformer": lambda: transformer_class(**spec.transformer),
        "vae": lambda: AutoencoderKL(**spec.vae),
    }
    *clip_names, t5_name = _text_encoder_names(spec)
    for name, config in zip(clip_names, spec.clip, strict=True):
        builders[name] = lambda config=config: clip_class(text_config(config, tokenizer))
    builders[t5_name] = lambda: T5EncoderModel(T5Config(**spec.t5))
    return builders


def family_parameter_counts(arch: str) -> dict[str, int]:
    """Parameters per model of ``arch``, counted on the meta device."""
    counts = {}
    for name, build in model_builders(family_arch(arch)).items():
        with torch.device("meta"):
            model = build()
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


def build_family_pipeline(
    out_dir: pathlib.Path,
    *,
    spec: FamilyArch,
    dtype: torch.dtype,
    seed: int = 0,
) -> pathlib.Path:
    """Write the diffusers folder of ``spec`` with random weights stored in ``dtype``, one
    model at a time (the caller has checked the disk)."""
    from worker.synthetic_model import _default_dtype
    from worker.tiny_families import build_t5_tokenizer
    from worker.tiny_model import build_tokenizer

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pixelmill-tokenizer-") as tmp:
        tokenizer = build_tokenizer(pathlib.Path(tmp))
        t5_tokenizer = build_t5_tokenizer(pathlib.Path(tmp) / "t5")
        builders = model_builders(spec, tokenizer)
        for index, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed + index)
            with _default_dtype(dtype), torch.no_grad():
                model = build()
            model.save_pretrained(out_dir / name, safe_serialization=True)
            del model
            gc.collect()
        # model_index.json names each component's class: written from models built on the
        # meta device (no memory), with the real tokenizers and scheduler, which are saved.
        with torch.device("meta"):
            skeleton = {name: build() for name, build in builders.items()}
        *clip_names, t5_name = _text_encoder_names(spec)
        tokenizers = {name.replace("text_encoder", "tokenizer"): tokenizer for name in clip_names}
        tokenizers[t5_name.replace("text_encoder", "tokenizer")] = t5_tokenizer
        pipe = _pipeline(spec, skeleton, tokenizers)
        pipe.save_config(out_dir)
        for name, component in tokenizers.items():
            component.save_pretrained(out_dir / name)
        pipe.scheduler.save_pretrained(out_dir / "scheduler")
    return out_dir


def _pipeline(spec: FamilyArch, models: dict[str, Any], tokenizers: dict[str, Any]) -> Any:
    scheduler = FlowMatchEulerDiscreteScheduler(**spec.scheduler)
    if spec.family == "sd3":
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            StableDiffusion3Pipeline,
        )

        return StableDiffusion3Pipeline(**models, **tokenizers, scheduler=scheduler)
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline(**models, **tokenizers, scheduler=scheduler)
