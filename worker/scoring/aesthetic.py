"""An aesthetic head on the CLIP image embedding, in the state dict format of the LAION
improved aesthetic predictor.

That predictor is a stack of linear layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout
between, no activations) saved as ``layers.0.weight``, ``layers.0.bias``, ``layers.2...``;
a plain linear head is one layer (``weight``, ``bias``). Both are a chain of linear layers
applied in the order of their index, which is all this loads: no code from the file runs
(``.safetensors``, or ``.pth`` through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch

from pixelmill.errors import BadInputError

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<index>\d+)\.(?P<param>weight|bias)$")


class AestheticHeadError(BadInputError):
    """The aesthetic head file cannot be read as a chain of linear layers."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AestheticHeadError(f"{path}: no such aesthetic head file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and pickle raise many kinds; all mean "unreadable"
        raise AestheticHeadError(f"{path}: not a readable state dict ({exc})") from exc
    if not isinstance(loaded, dict):
        raise AestheticHeadError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _layers(state: dict[str, torch.Tensor], path: Path) -> list[torch.nn.Linear]:
    if set(state) == {"weight", "bias"}:
        ordered = [("weight", "bias")]
    else:
        indices: dict[int, str] = {}
        for key in state:
            match = _LAYER_KEY.match(key)
            if match is None:
                raise AestheticHeadError(f"{path}: unexpected key {key!r} in the head")
            indices[int(match["index"])] = match["prefix"]
        ordered = [(f"{indices[i]}{i}.weight", f"{indices[i]}{i}.bias") for i in sorted(indices)]
    layers = []
    for weight_key, bias_key in ordered:
        if weight_key not in state or bias_key not in state:
            raise AestheticHeadError(f"{path}: layer {weight_key!r} lacks its weight or bias")
        weight, bias = state[weight_key], state[bias_key]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": bias})
        layers.append(layer)
    for before, after in itertools.pairwise(layers):
        if before.out_features != after.in_features:
            raise AestheticHeadError(
                f"{path}: a layer gives {before.out_features} values, the next takes "
                f"{after.in_features}"
            )
    if not layers or layers[-1].out_features != 1:
        raise AestheticHeadError(f"{path}: the head must end in one output")
    return layers


def load_aesthetic_head(path: Path, *, embedding_size: int) -> torch.nn.Sequential:
    """The head as an ``nn.Sequential`` of linear layers, in eval mode, on the CPU."""
    layers = _layers(read_state_dict(path), path)
    if layers[0].in_features != embedding_size:
        raise AestheticHeadError(
            f"{path}: the head takes {layers[0].in_features}-value embeddings, the scorer "
            f"gives {embedding_size}"
        )
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


def random_aesthetic_head(embedding_size: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random head in the LAION layout (smaller hidden sizes), for tests and the demo."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [embedding_size, 64, 32, 16, 8, 1]
    state: dict[str, torch.Tensor] = {}
    # LAION's layer indices: dropout layers sit between the first four linear layers.
    for index, size_in, size_out in zip((0, 2, 4, 6, 7), sizes, sizes[1:], strict=False):
        state[f"layers.{index}.weight"] = torch.randn(size_out, size_in, generator=generator)
        state[f"layers.{index}.bias"] = torch.randn(size_out, generator=generator)
    return state
