"""Full-size Stable Diffusion pipelines (SD 1.5, SDXL; SD3.5 and FLUX.1 in
:mod:`worker.synthetic_families`) with random weights, built offline.

The architecture is exactly that of the released checkpoints (the configs below are the
ones published with runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-
base-1.0), so a synthetic folder costs the same GPU time and memory per image as the real
model and loads through the same ``from_pretrained`` path. Only the weights are random: it
draws noise. Use it to measure throughput where the real weights cannot be downloaded.

The tokenizers are the byte-level CLIP tokenizer of :mod:`worker.tiny_model` (no BPE merges,
so no download); the text encoders keep CLIP's real 49,408-token embedding tables, so their
size is the real one. Ids of the byte-level vocabulary all fall inside that table.

Not included: SD 1.5's safety checker (a separate CLIP vision model): the synthetic pipeline
says it needs none, and images come out ``unchecked``.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, Literal, cast

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from worker.tiny_model import MODEL_MAX_LENGTH, build_tokenizer

Arch = Literal["sd15", "sdxl", "sd35", "sd35-medium", "flux-dev", "flux-schnell"]
ARCHES: tuple[Arch, ...] = ("sd15", "sdxl", "sd35", "sd35-medium", "flux-dev", "flux-schnell")
# Built by worker.synthetic_families.
FAMILY_ARCHES: tuple[Arch, ...] = ("sd35", "sd35-medium", "flux-dev", "flux-schnell")

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}

# CLIP's BPE vocabulary size: the embedding tables keep it whatever tokenizer is paired.
CLIP_VOCAB_SIZE = 49408

SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
}

SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    # 2816 = 1280 (pooled bigG text embedding) + 6 size/crop conditions x 256.
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True,
}

_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_VAE: dict[str, Any] = {**_VAE, "sample_size": 512}
# SDXL's VAE has SD's architecture; its latents are scaled differently and it runs in fp32.
SDXL_VAE: dict[str, Any] = {
    **_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# openai/clip-vit-large-patch14's text tower: SD 1.5's encoder and SDXL's first one.
CLIP_VIT_L_TEXT: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
}

# OpenCLIP ViT-bigG/14's text tower (with its projection): SDXL's second encoder.
CLIP_BIGG_TEXT: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 1280,
}

# The schedulers the released checkpoints ship with.
_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}


def sd15_scheduler() -> PNDMScheduler:
    return PNDMScheduler(**_SCHEDULE, set_alpha_to_one=False, skip_prk_steps=True)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        **_SCHEDULE,
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def text_config(base: dict[str, Any], tokenizer: CLIPTokenizer | None) -> CLIPTextConfig:
    """A CLIP text config whose special token ids are the paired tokenizer's (the encoder
    finds the end of the prompt by the EOS id)."""
    ids: dict[str, Any] = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return CLIPTextConfig(**base, **ids)


def build_models(arch: Arch, tokenizer: CLIPTokenizer | None = None) -> dict[str, Any]:
    """The pipeline's neural networks for ``arch``, built on the current default device and
    dtype (use ``with torch.device("meta"):`` to count parameters without memory)."""
    if arch in FAMILY_ARCHES:
        from worker.synthetic_families import family_arch, model_builders

        return {
            name: build() for name, build in model_builders(family_arch(arch), tokenizer).items()
        }
    if arch == "sd15":
        return {
            "unet": UNet2DConditionModel(**SD15_UNET),
            "vae": AutoencoderKL(**SD15_VAE),
            "text_encoder": CLIPTextModel(text_config(CLIP_VIT_L_TEXT, tokenizer)),
        }
    if arch == "sdxl":
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(text_config(CLIP_VIT_L_TEXT, tokenizer)),
            "text_encoder_2": CLIPTextModelWithProjection(text_config(CLIP_BIGG_TEXT, tokenizer)),
        }
    raise ValueError(f"--arch: unknown architecture {arch!r}; known: {', '.join(ARCHES)}")


def parameter_counts(arch: Arch) -> dict[str, int]:
    """Parameters per model of ``arch``, counted on the meta device (no memory, no time)."""
    if arch in FAMILY_ARCHES:
        from worker.synthetic_families import family_parameter_counts

        return family_parameter_counts(arch)
    with torch.device("meta"):
        models = build_models(arch)
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"--dtype: unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Building straight in the target dtype halves peak memory for fp16 (SDXL's UNet alone is
    # 10 GB in fp32).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def check_output_folder(out_dir: pathlib.Path, *, needed_bytes: int) -> None:
    """Refuse a non-empty folder, or a disk without room for the weights."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"--out: {out_dir} exists and is not an empty folder")
    parent = out_dir if out_dir.exists() else out_dir.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    # 5% slack for configs, the tokenizer files and safetensors headers.
    if free < needed_bytes * 1.05:
        raise OSError(
            f"--out: {out_dir} needs about {needed_bytes / 1e9:.1f} GB, "
            f"only {free / 1e9:.1f} GB free on {parent}"
        )


def build_synthetic_pipeline(
    out_dir: pathlib.Path, *, arch: Arch, dtype: torch.dtype = torch.float16, seed: int = 0
) -> pathlib.Path:
    """Write a diffusers folder of ``arch`` with random weights (stored in ``dtype``) at
    ``out_dir``, loadable offline with ``DiffusionPipeline.from_pretrained(out_dir)``."""
    if arch not in ARCHES:
        raise ValueError(f"--arch: unknown architecture {arch!r}; known: {', '.join(ARCHES)}")
    out_dir = pathlib.Path(out_dir)
    itemsize = torch.empty((), dtype=dtype).element_size()
    check_output_folder(out_dir, needed_bytes=sum(parameter_counts(arch).values()) * itemsize)
    if arch in FAMILY_ARCHES:
        from worker.synthetic_families import build_family_pipeline, family_arch

        return build_family_pipeline(out_dir, spec=family_arch(arch), dtype=dtype, seed=seed)

    with tempfile.TemporaryDirectory(prefix="pixelmill-tokenizer-") as tmp:
        tokenizer = build_tokenizer(pathlib.Path(tmp))
        torch.manual_seed(seed)
        with _default_dtype(dtype), torch.no_grad():
            # Any: diffusers' pipeline constructors are typed per component.
            models: dict[str, Any] = build_models(arch, tokenizer)
        pipe: Any
        if arch == "sd15":
            no_safety_checker: dict[str, Any] = {"safety_checker": None, "feature_extractor": None}
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
                StableDiffusionPipeline,
            )

            pipe = StableDiffusionPipeline(
                **models,
                tokenizer=tokenizer,
                scheduler=cast(Any, sd15_scheduler()),
                requires_safety_checker=False,
                **no_safety_checker,
            )
        else:
            from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
                StableDiffusionXLPipeline,
            )

            pipe = StableDiffusionXLPipeline(
                **models,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                scheduler=cast(Any, sdxl_scheduler()),
            )
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
