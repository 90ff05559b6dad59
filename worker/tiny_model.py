"""Tiny, random Stable Diffusion 1.x and SDXL pipelines for tests and offline smoke runs.

The components mirror diffusers' own test fixtures (``get_dummy_components`` in
tests/pipelines/stable_diffusion/test_stable_diffusion.py and
tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py) so the pipelines exercise
the same code paths as real SD 1.5 / SDXL checkpoints while weighing a few megabytes and
rendering in well under a second on CPU. Nothing here touches the network: the CLIP
tokenizer is built from a byte-level vocabulary written in code instead of being downloaded.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

# Imported from its module: under mypy, `from diffusers import StableDiffusionPipeline`
# resolves to diffusers' dummy placeholder class.
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

try:
    # transformers 5 without torchvision: CLIPImageProcessor falls back to this class anyway
    # and logs a warning saying so; naming it directly keeps the logs quiet.
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4.x
    from transformers import CLIPImageProcessor  # type: ignore[assignment]

# SD3 and FLUX.1 (dev, and schnell) are built by worker.tiny_families.
ARCHITECTURES = ("sd", "sdxl", "sd3", "flux", "flux-schnell")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode mapping (also used by CLIP's BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _tokenizer_vocab() -> dict[str, int]:
    """Byte-level vocabulary: every byte char, its end-of-word form, then BOS/EOS.

    With no merges, BPE splits every word into single byte characters, all of which are in
    this vocabulary, so any text (including non-latin prompts) tokenizes without <unk>.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(work_dir: pathlib.Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt into ``work_dir`` and load a CLIPTokenizer from them."""
    vocab_file = work_dir / "vocab.json"
    merges_file = work_dir / "merges.txt"
    vocab_file.write_text(json.dumps(_tokenizer_vocab(), ensure_ascii=False), encoding="utf-8")
    # A header-only merges file is valid: it just means no merges (pure byte-level BPE).
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    # Positional file paths: accepted by both the transformers 4.x (slow) and 5.x CLIPTokenizer.
    return CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )


def build_tiny_components(tokenizer: CLIPTokenizer, *, seed: int = 0) -> dict[str, Any]:
    """The pipeline's components with weights drawn from ``torch.manual_seed(seed)``.

    The seed is re-applied before each model, as diffusers' tests do, so every model's
    weights depend only on ``seed`` and not on the construction order of the others.
    """
    return {
        "unet": _tiny_unet(seed),
        "scheduler": _sd_scheduler(),
        "vae": _tiny_vae(seed, sample_size=64, norm_num_groups=2),
        "text_encoder": _tiny_text_encoder(tokenizer, seed),
        "tokenizer": tokenizer,
        "safety_checker": _tiny_safety_checker(tokenizer, seed),
        # The feature extractor must produce images at the vision tower's size (32).
        "feature_extractor": CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
    }


def _tiny_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )


def _sd_scheduler() -> PNDMScheduler:
    # steps_offset=1 and skip_prk_steps=True are the SD 1.x scheduler settings; other values
    # make StableDiffusionPipeline emit "outdated config" deprecation warnings.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def _tiny_vae(seed: int, *, sample_size: int, **options: Any) -> AutoencoderKL:
    """The tiny VAE of both architectures; ``options`` are where they differ."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=sample_size,
        **options,
    )


def _tiny_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=MODEL_MAX_LENGTH,
    )
    return CLIPTextModel(text_config)


def _tiny_safety_checker(tokenizer: CLIPTokenizer, seed: int) -> StableDiffusionSafetyChecker:
    torch.manual_seed(seed)
    safety_config = CLIPConfig(
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
        projection_dim=32,
    )
    return StableDiffusionSafetyChecker(safety_config)


def build_tiny_pipeline(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors) at ``out_dir``.

    The result loads offline with ``StableDiffusionPipeline.from_pretrained(out_dir)``.
    Returns ``out_dir``.
    """
    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="pixelmill-tokenizer-") as tmp:
        tokenizer = build_tokenizer(pathlib.Path(tmp))
        components = build_tiny_components(tokenizer, seed=seed)
        pipe = StableDiffusionPipeline(**components)
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _text_encoder_config(
    tokenizer: CLIPTokenizer, *, hidden_size: int, projection_dim: int
) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


# SDXL conditions the UNet on the concatenated hidden states of both text encoders, plus
# the second encoder's pooled projection and six size/crop "time ids" of
# ADDITION_TIME_EMBED_DIM each. The encoders get different widths on purpose: diffusers'
# single-file loader tells SDXL's two encoders apart by their embedding width (768 vs 1280
# in the real model), so equal widths would make a converted checkpoint load the first
# encoder's weights into the second.
SDXL_TEXT_ENCODER_HIDDEN = 32
SDXL_TEXT_ENCODER_2_HIDDEN = 64
SDXL_POOLED_DIM = 32
ADDITION_TIME_EMBED_DIM = 8


def build_tiny_sdxl_components(tokenizer: CLIPTokenizer, *, seed: int = 0) -> dict[str, Any]:
    """SDXL components after diffusers' SDXL test recipe, weights from ``seed``.

    Both tokenizers are the byte-level ``tokenizer`` (SDXL's two real tokenizers differ
    only in their padding token). There is no safety checker: SDXL ships none.
    """
    unet = _tiny_sdxl_unet(seed)
    vae = _tiny_vae(seed, sample_size=128)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        _text_encoder_config(
            tokenizer, hidden_size=SDXL_TEXT_ENCODER_HIDDEN, projection_dim=SDXL_POOLED_DIM
        )
    )
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(
            tokenizer, hidden_size=SDXL_TEXT_ENCODER_2_HIDDEN, projection_dim=SDXL_POOLED_DIM
        )
    )
    return {
        "unet": unet,
        "scheduler": _sdxl_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _tiny_sdxl_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + SDXL_POOLED_DIM,
        cross_attention_dim=SDXL_TEXT_ENCODER_HIDDEN + SDXL_TEXT_ENCODER_2_HIDDEN,
        norm_num_groups=1,
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )


def build_tiny_sdxl_pipeline(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Build the tiny SDXL pipeline and save it as a diffusers folder (safetensors).

    The result loads offline with ``StableDiffusionXLPipeline.from_pretrained(out_dir)``
    (or ``AutoPipelineForText2Image``). Returns ``out_dir``.
    """
    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="pixelmill-tokenizer-") as tmp:
        tokenizer = build_tokenizer(pathlib.Path(tmp))
        components = build_tiny_sdxl_components(tokenizer, seed=seed)
        # No invisible watermark: it would need an extra package and alters pixels.
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny(out_dir: pathlib.Path, *, arch: str = "sd", seed: int = 0) -> pathlib.Path:
    """Build the tiny pipeline of architecture ``arch`` (one of :data:`ARCHITECTURES`) at
    ``out_dir``."""
    if arch == "sd":
        return build_tiny_pipeline(out_dir, seed=seed)
    if arch == "sdxl":
        return build_tiny_sdxl_pipeline(out_dir, seed=seed)
    if arch in ARCHITECTURES:
        from worker.tiny_families import build_tiny_family

        return build_tiny_family(out_dir, arch=arch, seed=seed)
    raise ValueError(
        f"arch: unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.tiny_model OUT_DIR [--arch sd|sdxl|sd3|flux|flux-schnell] [--seed N]``
    for smoke runs."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Build a tiny random SD 1.x, SDXL, SD3 or FLUX.1 pipeline."
    )
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="sd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny(args.out_dir, arch=args.arch, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
