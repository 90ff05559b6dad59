"""Turn a diffusers pipeline folder into one original-format (LDM / A1111) checkpoint file.

Test helper: the single-file loading path needs checkpoints, and nothing may be downloaded,
so the tests convert the tiny models (``worker.tiny_model``) into the layout that
CompVis/Stability checkpoints and AUTOMATIC1111 use. The key mapping follows diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py (SD 1.x) and
scripts/convert_diffusers_to_original_sdxl.py (SDXL), but where those scripts hard-code the
block numbering of the full-size models (four UNet levels for SD, three for SDXL), this
derives it from the folder's own unet/vae ``config.json``, so tiny models with two levels
convert correctly too. Every key must be mapped: an unknown one is an error, never dropped.

LDM layout, for reference (``L`` = ``layers_per_block``):

* UNet, under ``model.diffusion_model.``: ``input_blocks.0.0`` is ``conv_in``; down level
  ``i`` layer ``j`` is ``input_blocks.{1 + i*(L+1) + j}`` (``.0`` resnet, ``.1`` attention),
  its downsampler ``input_blocks.{(i+1)*(L+1)}.0.op``; ``middle_block.0/1/2`` are resnet,
  attention, resnet; up level ``i`` layer ``j`` (``L+1`` of them) is
  ``output_blocks.{i*(L+1) + j}`` and its upsampler the last layer's ``.1`` (no attention)
  or ``.2`` (after the attention); ``time_embed.0/2``, ``label_emb.0.0/0.2`` (SDXL's
  ``add_embedding``), ``out.0/2``.
* VAE, under ``first_stage_model.``: ``encoder.down.{i}.block.{j}``, ``decoder.up.{n-1-i}``
  (LDM numbers the decoder levels bottom-up), ``mid.block_1/2``, ``mid.attn_1`` with 1x1
  conv weights, ``nin_shortcut``, ``norm_out``.
* Text encoders: SD 1.x's CLIP-L under ``cond_stage_model.transformer.`` in Hugging Face
  naming; SDXL's CLIP-L under ``conditioner.embedders.0.transformer.`` and its OpenCLIP
  bigG under ``conditioner.embedders.1.model.`` in OpenCLIP naming (fused ``in_proj`` q/k/v,
  ``resblocks``, ``ln_final``, a transposed ``text_projection``).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

SD_PIPELINE = "StableDiffusionPipeline"
SDXL_PIPELINE = "StableDiffusionXLPipeline"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

StateDict = dict[str, torch.Tensor]


class UnmappedKeyError(ValueError):
    """A diffusers weight this converter has no LDM name for."""


# --- UNet ---------------------------------------------------------------------------------

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's size/crop/pooled-text conditioning.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}

_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_UNET_BLOCK_RE = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_UNET_DOWNSAMPLER_RE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_UNET_UPSAMPLER_RE = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)")
_UNET_MID_RE = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _unet_resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    if part not in _UNET_RESNET_PARTS:
        raise UnmappedKeyError(f"unet resnet weight {rest!r}")
    return f"{_UNET_RESNET_PARTS[part]}.{tail}"


def _layers_per_block(config: dict[str, object]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        # Per-level layer counts exist in diffusers but in no SD/SDXL checkpoint.
        raise ValueError(f"unet config: layers_per_block must be one integer, got {layers!r}")
    return layers


def unet_key_to_ldm(key: str, config: dict[str, object]) -> str:
    """The LDM name (without ``model.diffusion_model.``) of diffusers UNet weight ``key``."""
    per_level = _layers_per_block(config) + 1  # LDM: L layers, then the resampler's slot
    up_types = config["up_block_types"]
    assert isinstance(up_types, list | tuple)

    module, _, param = key.rpartition(".")
    if module in _UNET_TOP_LEVEL:
        return f"{_UNET_TOP_LEVEL[module]}.{param}"
    if match := _UNET_BLOCK_RE.fullmatch(key):
        direction, level, kind, layer, rest = match.groups()
        if direction == "down":
            index = 1 + int(level) * per_level + int(layer)
            name = "input_blocks"
        else:
            index = int(level) * per_level + int(layer)
            name = "output_blocks"
        if kind == "resnets":
            return f"{name}.{index}.0.{_unet_resnet(rest)}"
        return f"{name}.{index}.1.{rest}"  # transformer weights keep their names
    if match := _UNET_DOWNSAMPLER_RE.fullmatch(key):
        level, rest = match.groups()
        return f"input_blocks.{(int(level) + 1) * per_level}.0.op.{rest}"
    if match := _UNET_UPSAMPLER_RE.fullmatch(key):
        level, rest = match.groups()
        # The upsampler follows the level's last layer: after its attention if it has one.
        slot = 2 if "CrossAttn" in str(up_types[int(level)]) else 1
        return f"output_blocks.{int(level) * per_level + per_level - 1}.{slot}.conv.{rest}"
    if match := _UNET_MID_RE.fullmatch(key):
        kind, layer, rest = match.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(layer)}.{_unet_resnet(rest)}"
    raise UnmappedKeyError(f"unet weight {key!r}")


# --- VAE ----------------------------------------------------------------------------------

_VAE_TOP_LEVEL_RE = re.compile(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)")
_VAE_DOWN_RESNET_RE = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)")
_VAE_DOWNSAMPLER_RE = re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_VAE_UP_RESNET_RE = re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)")
_VAE_UPSAMPLER_RE = re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)")
_VAE_MID_RESNET_RE = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)")
_VAE_MID_ATTENTION_RE = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)")

_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_resnet(rest: str) -> str:
    # The VAE's resnets use the same names in both formats except the shortcut.
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_key_to_ldm(key: str, config: dict[str, object]) -> str:
    """The LDM name (without ``first_stage_model.``) of diffusers VAE weight ``key``."""
    up_types = config["up_block_types"]
    assert isinstance(up_types, list | tuple)
    levels = len(up_types)

    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    if match := _VAE_TOP_LEVEL_RE.fullmatch(key):
        side, module, param = match.groups()
        return f"{side}.{'norm_out' if module == 'conv_norm_out' else module}.{param}"
    if match := _VAE_DOWN_RESNET_RE.fullmatch(key):
        level, layer, rest = match.groups()
        return f"encoder.down.{level}.block.{layer}.{_vae_resnet(rest)}"
    if match := _VAE_DOWNSAMPLER_RE.fullmatch(key):
        level, rest = match.groups()
        return f"encoder.down.{level}.downsample.conv.{rest}"
    if match := _VAE_UP_RESNET_RE.fullmatch(key):
        level, layer, rest = match.groups()
        return f"decoder.up.{levels - 1 - int(level)}.block.{layer}.{_vae_resnet(rest)}"
    if match := _VAE_UPSAMPLER_RE.fullmatch(key):
        level, rest = match.groups()
        return f"decoder.up.{levels - 1 - int(level)}.upsample.conv.{rest}"
    if match := _VAE_MID_RESNET_RE.fullmatch(key):
        side, layer, rest = match.groups()
        return f"{side}.mid.block_{int(layer) + 1}.{_vae_resnet(rest)}"
    if match := _VAE_MID_ATTENTION_RE.fullmatch(key):
        side, rest = match.groups()
        module, _, param = rest.rpartition(".")
        if module not in _VAE_ATTENTION_PARTS:
            raise UnmappedKeyError(f"vae attention weight {key!r}")
        return f"{side}.mid.attn_1.{_VAE_ATTENTION_PARTS[module]}.{param}"
    raise UnmappedKeyError(f"vae weight {key!r}")


def _vae_tensor_to_ldm(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    # LDM's VAE attention projects with 1x1 convolutions; diffusers uses linear layers.
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


# --- text encoders ------------------------------------------------------------------------


def _hf_clip_keys(state: StateDict) -> StateDict:
    """Hugging Face CLIP keys in the classic ``text_model.``-prefixed naming.

    transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` wrapper; original
    checkpoints (and diffusers' single-file loader) expect it. ``position_ids`` is a buffer
    that older transformers saved and checkpoints need not carry.
    """
    converted: StateDict = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_model.") or key == "text_projection.weight":
            converted[key] = tensor
        else:
            converted[f"text_model.{key}"] = tensor
    return converted


_OPENCLIP_LAYER_RE = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_OPENCLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPENCLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def openclip_state_dict(hf_state: StateDict) -> StateDict:
    """A CLIPTextModelWithProjection state dict in OpenCLIP naming (SDXL's second encoder)."""
    state = _hf_clip_keys(hf_state)
    converted: StateDict = {}
    # OpenCLIP fuses q, k and v into one in_proj matrix per layer, in that order.
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in _OPENCLIP_TOP_LEVEL:
            converted[_OPENCLIP_TOP_LEVEL[key]] = tensor
            continue
        if key == "text_projection.weight":
            # nn.Linear stores (out, in); OpenCLIP multiplies by an (in, out) matrix.
            converted["text_projection"] = tensor.T.contiguous()
            continue
        match = _OPENCLIP_LAYER_RE.fullmatch(key)
        if match is None:
            raise UnmappedKeyError(f"text_encoder_2 weight {key!r}")
        layer, rest = match.groups()
        module, _, param = rest.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault(f"{layer}.{param}", {})[module[-6]] = tensor
            continue
        if module not in _OPENCLIP_LAYER_PARTS:
            raise UnmappedKeyError(f"text_encoder_2 weight {key!r}")
        converted[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER_PARTS[module]}.{param}"] = tensor
    for layer_param, parts in fused.items():
        layer, param = layer_param.split(".")
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"text_encoder_2 layer {layer}: q/k/v {param} incomplete")
        converted[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return converted


# --- whole pipelines ----------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> dict[str, object]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def _renamed(
    state: StateDict,
    rename: Callable[[str], str],
    prefix: str,
    transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda _key, tensor: tensor,
) -> StateDict:
    converted: StateDict = {}
    for key, tensor in state.items():
        ldm_key = prefix + rename(key)
        if ldm_key in converted:
            raise ValueError(f"two weights map to {ldm_key!r} (the second is {key!r})")
        converted[ldm_key] = transform(ldm_key, tensor)
    return converted


def ldm_state_dict(pipeline_dir: pathlib.Path) -> StateDict:
    """All weights of the SD 1.x or SDXL diffusers folder ``pipeline_dir``, in LDM naming."""
    pipeline_dir = pathlib.Path(pipeline_dir)
    pipeline_class = _read_json(pipeline_dir / "model_index.json")["_class_name"]
    if pipeline_class not in (SD_PIPELINE, SDXL_PIPELINE):
        raise ValueError(f"{pipeline_dir}: cannot convert a {pipeline_class} to a checkpoint")

    unet_config = _read_json(pipeline_dir / "unet" / "config.json")
    vae_config = _read_json(pipeline_dir / "vae" / "config.json")
    unet = load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")
    text_encoder = _hf_clip_keys(load_file(pipeline_dir / "text_encoder" / "model.safetensors"))

    checkpoint: StateDict = {
        **_renamed(unet, lambda key: unet_key_to_ldm(key, unet_config), UNET_PREFIX),
        **_renamed(
            vae, lambda key: vae_key_to_ldm(key, vae_config), VAE_PREFIX, _vae_tensor_to_ldm
        ),
    }
    if pipeline_class == SD_PIPELINE:
        checkpoint.update(_renamed(text_encoder, str, SD_TEXT_ENCODER_PREFIX))
    else:
        text_encoder_2 = load_file(pipeline_dir / "text_encoder_2" / "model.safetensors")
        checkpoint.update(_renamed(text_encoder, str, SDXL_TEXT_ENCODER_PREFIX))
        checkpoint.update(
            _renamed(openclip_state_dict(text_encoder_2), str, SDXL_TEXT_ENCODER_2_PREFIX)
        )
    return checkpoint


def convert_to_single_file(pipeline_dir: pathlib.Path, out_file: pathlib.Path) -> pathlib.Path:
    """Write ``pipeline_dir`` as one checkpoint: safetensors, or a pickled ``.ckpt``.

    The ``.ckpt`` form nests the weights under ``"state_dict"`` as the original training
    code saved them. Returns ``out_file``.
    """
    out_file = pathlib.Path(out_file)
    state = {key: tensor.contiguous() for key, tensor in ldm_state_dict(pipeline_dir).items()}
    if out_file.suffix == ".ckpt":
        torch.save({"state_dict": state}, out_file)
    else:
        save_file(state, out_file, metadata={"format": "pt"})
    return out_file


def copy_configs_only(pipeline_dir: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Copy ``pipeline_dir`` without its weights: the architecture a checkpoint needs.

    This is what diffusers itself fetches from the Hub for ``from_single_file`` (json,
    txt and tokenizer files). Tests load checkpoints against such a folder because, given a
    folder that does hold weights, diffusers quietly loads any component the checkpoint
    lacks from there, which would hide a component the conversion got wrong.
    """
    pipeline_dir, out_dir = pathlib.Path(pipeline_dir), pathlib.Path(out_dir)
    for source in sorted(pipeline_dir.rglob("*")):
        if source.is_dir() or source.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
            continue
        target = out_dir / source.relative_to(pipeline_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return out_dir
