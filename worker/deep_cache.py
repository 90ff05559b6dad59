"""DeepCache for a UNet2DConditionModel: reuse its deep features between steps (approximate).

Adjacent denoising steps change the UNet's deep, low-resolution features very little
(Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024). Every
``interval``-th step runs the whole UNet and keeps what its deep part produced; the steps in
between run only the outermost down block and the outermost up block (the full-resolution
"skip branch") and reuse the kept deep features. With interval N, N-1 of every N steps skip
everything below the top level: most of the UNet's work at SD resolutions.

Implemented here rather than with the ``DeepCache`` package (written for diffusers 0.24, it
patches the pipelines' code): the deep blocks' ``forward`` is replaced, for one render, by one
that runs the block on full steps and returns its kept output on the others. The UNet is
unchanged after the ``with`` block. Pixels differ from the plain render: images made with it
say so in their metadata (``approximate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch


class DeepCacheUnavailable(ValueError):
    """The denoiser is not a UNet with the block layout DeepCache needs."""


@dataclasses.dataclass
class _State:
    interval: int
    calls: int = 0  # UNet forwards so far: one per step (CFG batches both halves)
    full_steps: int = 0

    def reuse(self) -> bool:
        # Read while the UNet runs; ``calls`` was counted by the pre-hook of this forward.
        return (self.calls - 1) % self.interval != 0


def _deep_blocks(unet: Any) -> list[tuple[str, torch.nn.Module]]:
    """The blocks below the skip branch: every down block but the first, the mid block and
    every up block but the last (whose output is the feature the last up block reads)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise DeepCacheUnavailable(
            f"deepcache: needs a UNet2DConditionModel denoiser (SD 1.x, SD 2.x, SDXL), not "
            f"{type(unet).__name__}"
        )
    if len(unet.down_blocks) < 2 or unet.mid_block is None:
        raise DeepCacheUnavailable("deepcache: the UNet has no deep blocks to cache")
    blocks: list[tuple[str, torch.nn.Module]] = [
        (f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks) if i > 0
    ]
    blocks.append(("mid_block", unet.mid_block))
    last = len(unet.up_blocks) - 1
    blocks += [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks) if i < last]
    return blocks


def _cached_forward(
    state: _State, name: str, forward: Callable[..., Any], kept: dict[str, Any]
) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if state.reuse() and name in kept:
            return kept[name]
        output = forward(*args, **kwargs)
        kept[name] = output
        return output

    return run


@contextlib.contextmanager
def deep_cache(unet: Any, interval: int) -> Iterator[_State]:
    """Within the block, ``unet`` runs fully on steps 0, N, 2N, ... and reuses its deep
    features on the others. Raises DeepCacheUnavailable for a denoiser it cannot cache."""
    if interval < 2:
        raise ValueError(f"deepcache interval must be >= 2, got {interval}")
    blocks = _deep_blocks(unet)
    state = _State(interval=interval)
    kept: dict[str, Any] = {}

    def count_call(_module: Any, _args: Any) -> None:
        state.calls += 1
        if not state.reuse():
            state.full_steps += 1

    hook = unet.register_forward_pre_hook(count_call)
    try:
        for name, block in blocks:
            # An instance attribute shadows the class's forward; deleting it restores it.
            block.forward = _cached_forward(state, name, block.forward, kept)
        yield state
    finally:
        hook.remove()
        for _name, block in blocks:
            if "forward" in vars(block):
                del block.forward
        kept.clear()
