"""Tiny, random adapters for the tiny pipelines (worker.tiny_model): a ControlNet, a LoRA and a
Textual Inversion embedding, saved to disk in the formats real ones use, so tests load them
through the worker's normal loading code. Built offline in well under a second each.

Random weights alone would not do: diffusers initialises a ControlNet's output convolutions
to zero (a fresh ControlNet changes nothing) and peft initialises LoRA's B matrices to zero
(a fresh LoRA changes nothing). Both are re-drawn here so each adapter visibly changes the
image, which is what the tests need to see (and to see gone after unloading).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch

# The token tests bind the tiny embedding to; any string outside the tokenizer's vocabulary.
TINY_EMBEDDING_TOKEN = "<pixelmill-tiny>"
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def _pipeline_class_name(model_dir: pathlib.Path) -> str:
    index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    name: str = index["_class_name"]
    return name


def _is_sdxl(model_dir: pathlib.Path) -> bool:
    return "XL" in _pipeline_class_name(model_dir)


def _unet(model_dir: pathlib.Path) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        str(model_dir), subfolder="unet", local_files_only=True
    )


def build_tiny_controlnet(
    model_dir: pathlib.Path, out_dir: pathlib.Path, *, seed: int = 0
) -> pathlib.Path:
    """A ControlNet for the tiny pipeline at ``model_dir`` (SD or SDXL), saved as a diffusers
    folder at ``out_dir``; ``ControlNetModel.from_pretrained(out_dir)`` loads it."""
    from diffusers import ControlNetModel

    model_dir, out_dir = pathlib.Path(model_dir), pathlib.Path(out_dir)
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text(encoding="utf-8"))
    # The conditioning embedding must shrink the control image by the VAE's factor
    # (2 ** (blocks - 1)): one stride-2 convolution per extra block.
    blocks = len(vae_config["block_out_channels"])
    controlnet = ControlNetModel.from_unet(
        _unet(model_dir),
        conditioning_embedding_out_channels=tuple(16 * 2**i for i in range(blocks)),
    )
    generator = torch.Generator().manual_seed(seed)
    # Replace the zero convolutions, so the control image reaches the UNet.
    zero_convs = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
            conv.bias.zero_()
    controlnet.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def build_tiny_lora(
    model_dir: pathlib.Path, out_file: pathlib.Path, *, seed: int = 0, rank: int = 4
) -> pathlib.Path:
    """A LoRA on the attention projections of the tiny pipeline's UNet, saved with the
    pipeline class's ``save_lora_weights`` as ``out_file`` (a ``.safetensors`` file that
    ``load_lora_weights`` reads).

    UNet only: loading text-encoder LoRA layers goes through transformers' PEFT integration,
    which needs a newer peft than this project pins.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_dir, out_file = pathlib.Path(model_dir), pathlib.Path(out_file)
    unet = _unet(model_dir)
    torch.manual_seed(seed)
    # init_lora_weights=False draws B at random too (peft's default makes it zero).
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=list(LORA_TARGET_MODULES),
            init_lora_weights=False,
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_class: Any = (
        StableDiffusionXLPipeline if _is_sdxl(model_dir) else StableDiffusionPipeline
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(
        save_directory=str(out_file.parent),
        unet_lora_layers=layers,
        weight_name=out_file.name,
        safe_serialization=True,
    )
    return out_file


def build_tiny_embedding(
    model_dir: pathlib.Path, out_file: pathlib.Path, *, seed: int = 0, vectors: int = 1
) -> pathlib.Path:
    """A Textual Inversion embedding of ``vectors`` vectors for the tiny pipeline's text
    encoder(s), saved as safetensors: ``emb_params`` for SD (A1111's layout), ``clip_l`` and
    ``clip_g`` for SDXL (one per text encoder)."""
    from safetensors.torch import save_file

    model_dir, out_file = pathlib.Path(model_dir), pathlib.Path(out_file)

    def hidden_size(encoder: str) -> int:
        config = json.loads((model_dir / encoder / "config.json").read_text(encoding="utf-8"))
        size: int = config["hidden_size"]
        return size

    generator = torch.Generator().manual_seed(seed)

    def vectors_for(encoder: str) -> torch.Tensor:
        return torch.randn((vectors, hidden_size(encoder)), generator=generator)

    if _is_sdxl(model_dir):
        tensors = {"clip_l": vectors_for("text_encoder"), "clip_g": vectors_for("text_encoder_2")}
    else:
        tensors = {"emb_params": vectors_for("text_encoder")}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file))
    return out_file


def build_tiny_adapters(model_dir: pathlib.Path, out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """All three for ``model_dir`` under ``out_dir``: {"controlnet", "lora", "embedding"}."""
    out_dir = pathlib.Path(out_dir)
    return {
        "controlnet": build_tiny_controlnet(model_dir, out_dir / "controlnet"),
        "lora": build_tiny_lora(model_dir, out_dir / "lora.safetensors"),
        "embedding": build_tiny_embedding(model_dir, out_dir / "embedding.safetensors"),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.tiny_adapters MODEL_DIR OUT_DIR``: a tiny ControlNet, LoRA and
    embedding for the tiny pipeline at MODEL_DIR (see worker.tiny_model)."""
    import argparse

    parser = argparse.ArgumentParser(description="Build tiny adapters for a tiny pipeline.")
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("out_dir", type=pathlib.Path)
    args = parser.parse_args(argv)
    for name, path in build_tiny_adapters(args.model_dir, args.out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
