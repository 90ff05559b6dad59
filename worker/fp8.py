"""FP8 dynamic quantisation of the denoiser's linear layers, through torchao, on Hopper.

Weights are stored in float8 (e4m3) with one scale per row, and each linear layer's input is
quantised on the fly (per row): the matmuls run on the FP8 tensor cores of SM 8.9+/9.0 GPUs at
twice the fp16 rate, for a small loss of precision (the image's metadata says ``approximate``).
Convolutions, norms and attention itself stay in fp16.

torchao is an optional extra (``pip install 'pixelmill[fp8]'``); without it, or without a
GPU of compute capability 9.0 (H100, H200), :func:`fp8_unavailable` says why and
:func:`quantised_copy` refuses with that reason.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch

from pixelmill.errors import BadInputError

# Hopper: the FP8 kernels torchao's float8 path is tuned and verified for.
REQUIRED_CAPABILITY = (9, 0)
# Layers smaller than this gain nothing from FP8 (the per-call quantisation costs more).
MIN_FEATURES = 128


class Fp8Unavailable(BadInputError):
    """FP8 was asked for where it cannot run: the message says what is missing."""


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 cannot run on ``device`` here (None: it can)."""
    if importlib.util.find_spec("torchao") is None:
        return "fp8: torchao is not installed (pip install 'pixelmill[fp8]')"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"fp8: needs an SM 9.0 (Hopper) CUDA GPU; this worker renders on {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < REQUIRED_CAPABILITY:
        return (
            f"fp8: needs an SM 9.0 (Hopper) GPU; {torch.cuda.get_device_name(device)} is SM "
            f"{capability[0]}.{capability[1]}"
        )
    return None


def _quantisable(module: torch.nn.Module, _name: str) -> bool:
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features >= MIN_FEATURES
        and module.out_features >= MIN_FEATURES
    )


def quantised_copy(denoiser: torch.nn.Module, device: torch.device) -> Any:
    """A copy of ``denoiser`` with its linear layers in FP8 (the original is left as it is, so
    jobs without FP8 keep rendering with it). Raises Fp8Unavailable where it cannot run."""
    reason = fp8_unavailable(device)
    if reason is not None:
        raise Fp8Unavailable(reason)
    from torchao.quantization import (  # type: ignore[import-not-found, unused-ignore]
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    quantised = copy.deepcopy(denoiser)
    quantize_(
        quantised,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=_quantisable,
    )
    return quantised
