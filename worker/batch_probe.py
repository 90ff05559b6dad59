"""How many seeds one pipeline call renders: found by a memory probe on CUDA, configured on CPU.

A fixed batch of 4 leaves most of an 80 GB GPU idle on SD 1.5 and does not fit on a small
one with SDXL. On CUDA, the first job of each (model, kind, size, fast path) renders one-step
batches of 1, 2, 4, ... seeds, measures each one's peak memory and stops at the first that
runs out of memory or leaves less than ``render_batch_headroom`` of the GPU free; the largest
batch that fit (at most ``render_batch_max``) is kept for the process. A render's peak memory
is that of one denoiser call plus the VAE decode, whatever the steps, so one step measures it.
On CPU (no memory to find) it is ``render_batch_size``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from pixelmill.settings import Settings

log = logging.getLogger(__name__)

# Per denoiser (shared by a model's kind pipelines): (kind, width, height, fast path) -> size.
_FOUND: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def largest_fitting_batch(
    peak_bytes: Callable[[int], int], *, budget_bytes: int, limit: int
) -> int:
    """The largest batch in 1, 2, 4, ..., ``limit`` (and ``limit`` itself) whose render
    ``peak_bytes(batch)`` says fits in ``budget_bytes``; a batch that raises
    torch.OutOfMemoryError does not fit. At least 1: a model whose single image does not fit
    fails its job on the render itself, with CUDA's own error."""
    best = 1
    size = 1
    while size <= limit:
        try:
            peak = peak_bytes(size)
        except torch.OutOfMemoryError:
            break
        if peak > budget_bytes:
            break
        best = size
        if size == limit:
            break
        size = min(size * 2, limit)
    return best


def _cuda_peak(render: Callable[[int], object], device: torch.device) -> Callable[[int], int]:
    def peak_bytes(batch: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            render(batch)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        finally:
            torch.cuda.empty_cache()

    return peak_bytes


def batch_size(pipe: Any, params: Any, settings: Settings) -> int:
    """The batch size for rendering ``params`` on ``pipe`` (a RenderParams): probed once on
    CUDA (see the module's text), ``render_batch_size`` elsewhere."""
    device = getattr(pipe, "device", torch.device("cpu"))
    if device.type != "cuda" or not settings.render_batch_probe:
        return settings.render_batch_size
    from worker.fast_path import denoiser_of
    from worker.pipeline import render_batch

    key = (params.kind, params.width, params.height, params.fast_path)
    with _LOCK:
        found = _FOUND.setdefault(denoiser_of(pipe), {})
        if key in found:
            return found[key]
        # Probed uncompiled: compiling every probe size would cost minutes, and a compiled
        # graph needs no more memory than the eager one.
        fast = None if params.fast_path is None else params.fast_path.without_compile()
        probe = dataclasses.replace(
            params, steps=1, strength=_probe_strength(params), fast_path=fast
        )
        total = torch.cuda.get_device_properties(device).total_memory
        size = largest_fitting_batch(
            _cuda_peak(lambda n: render_batch(pipe, probe, list(range(n))), device),
            budget_bytes=int(total * (1 - settings.render_batch_headroom)),
            limit=settings.render_batch_max,
        )
        found[key] = size
    log.info(
        "batch size %d for %s %dx%d (memory probe)", size, params.kind, params.width, params.height
    )
    return size


def _probe_strength(params: Any) -> float | None:
    # img2img runs int(steps * strength) steps and needs at least one.
    return None if params.strength is None else 1.0
