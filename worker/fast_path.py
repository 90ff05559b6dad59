"""The fast path: how a job's denoiser and VAE run, chosen per model (settings) or template.

Options, and what they do to pixels (the README's table has the measured figures):

- ``channels_last``: convolution weights in NHWC, the layout GPU conv kernels prefer. Exact
  within rounding (max 1/255 on the tiny model, CPU fp32).
- ``fuse_qkv``: each attention's query/key/value projections as one matmul (diffusers'
  ``fuse_qkv_projections``). Exact within rounding. Off for a job with LoRAs: their layers sit
  on the separate projections, which a fused attention would bypass.
- ``compile``: ``torch.compile`` of the denoiser and the VAE decoder in a mode ("default",
  "reduce-overhead" = CUDA graphs, "max-autotune[-no-cudagraphs]"), its kernels cached on
  disk (:mod:`worker.compile_cache`). Exact within rounding.
- ``fp8`` (template only): the denoiser's linear layers in FP8 through torchao, Hopper only
  (:mod:`worker.fp8`). Approximate.
- ``deepcache_interval`` (template only): :mod:`worker.deep_cache`. Approximate.

The exact options are the defaults (settings); the approximate ones change pixels, so they
come only from a template, and the job's options (hence its dedupe key) carry them. A
pipeline keeps the state its last job left (fusing or converting every job would cost more
than the render); :func:`applied_fast_path` changes only what the next job needs otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from db.job_options import FastPathSpec, JobOptions
from pixelmill.errors import BadInputError
from pixelmill.settings import Settings

# The tolerance within which the exact options are the plain render (8-bit pixel levels).
EXACT_TOLERANCE = 1
# CUDA graphs replay fixed buffers: for the VAE decoder (one call per batch, large
# activations) they cost more memory than they save time.
_VAE_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


@dataclasses.dataclass(frozen=True)
class FastPath:
    """What one render runs with. ``compile`` is a torch.compile mode (None: not compiled)."""

    channels_last: bool = False
    fuse_qkv: bool = False
    compile: str | None = None
    compile_vae: bool = False
    fp8: bool = False
    deepcache_interval: int | None = None
    cache_dir: pathlib.Path | None = None  # the compile cache (worker.compile_cache)

    @property
    def approximate(self) -> bool:
        """Whether pixels differ from the plain render beyond rounding."""
        return self.fp8 or self.deepcache_interval is not None

    def denoiser_mode(self) -> str | None:
        # DeepCache decides per step in Python which blocks run: not a graph to compile.
        return None if self.deepcache_interval is not None else self.compile

    def vae_mode(self) -> str | None:
        if self.compile is None or not self.compile_vae:
            return None
        return _VAE_MODES.get(self.compile, self.compile)

    def without_compile(self) -> FastPath:
        return dataclasses.replace(self, compile=None)

    def record(self) -> dict[str, Any]:
        """What the image's metadata says about how it was rendered."""
        return {
            "channels_last": self.channels_last,
            "fuse_qkv": self.fuse_qkv,
            "compile": self.denoiser_mode() or "off",
            "compile_vae": self.vae_mode() or "off",
            "fp8": self.fp8,
            "deepcache_interval": self.deepcache_interval,
            "approximate": self.approximate,
        }


PLAIN = FastPath()


def _model_overrides(settings: Settings, model_name: str) -> dict[str, bool | str]:
    models = settings.fast_path_models
    default = models.get("default", {}) if model_name == settings.model else {}
    return {**default, **models.get(model_name, {})}


def _configured_compile(settings: Settings, device: torch.device) -> str:
    if settings.fast_path_compile != "auto":
        return settings.fast_path_compile
    if device.type == "cuda":
        return settings.fast_path_compile_mode
    # The older switch (compile the UNet whatever the device) still means what it said.
    return "default" if settings.torch_compile else "off"


def job_fast_path(
    settings: Settings, model_name: str, options: JobOptions, device: torch.device
) -> FastPath:
    """The fast path of a job on ``model_name``: the template's choices (``options``), else
    the model's entry in ``fast_path_models``, else the settings. Raises a BadInputError for
    a choice this worker cannot render (FP8 without Hopper/torchao, FP8 with LoRAs)."""
    from worker.fp8 import Fp8Unavailable, fp8_unavailable

    spec = options.fast_path or FastPathSpec()
    model = _model_overrides(settings, model_name)

    def pick(name: str, configured: bool | str) -> Any:
        value = getattr(spec, name)
        return value if value is not None else model.get(name, configured)

    compile_mode = str(pick("compile", _configured_compile(settings, device)))
    if spec.fp8:
        reason = fp8_unavailable(device)
        if reason is not None:
            raise Fp8Unavailable(reason)
        if options.loras:
            raise BadInputError("fp8: a job with LoRAs cannot use fp8 (fast_path.fp8)")
    return FastPath(
        channels_last=bool(pick("channels_last", settings.fast_path_channels_last)),
        # LoRA layers wrap to_q/to_k/to_v: a fused projection would bypass them.
        fuse_qkv=bool(pick("fuse_qkv", settings.fast_path_fuse_qkv)) and not options.loras,
        compile=None if compile_mode == "off" else compile_mode,
        compile_vae=settings.fast_path_compile_vae,
        fp8=spec.fp8,
        deepcache_interval=spec.deepcache_interval,
        cache_dir=settings.resolved_compile_cache_dir,
    )


# --- applying it to a pipeline ----------------------------------------------------------------


def denoiser_of(pipe: Any) -> Any:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


@dataclasses.dataclass
class _State:
    """What a denoiser (and its pipeline's VAE) was left with by the last job."""

    channels_last: bool = False
    fused: bool = False
    # Per fusable module: (its processors unfused, fused); filled by the first fusion.
    processors: dict[int, tuple[dict[str, Any], dict[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    compiled: dict[str, str | None] = dataclasses.field(default_factory=dict)
    fp8_copy: Any = None


# Keyed by the denoiser, which a kind's pipeline (from_pipe) shares with the base one.
_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()


def _fusable(pipe: Any) -> list[Any]:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    kinds = (UNet2DConditionModel, AutoencoderKL)
    modules = (denoiser_of(pipe), getattr(pipe, "vae", None))
    return [module for module in modules if isinstance(module, kinds)]


def _set_fused(pipe: Any, state: _State, on: bool) -> None:
    for module in _fusable(pipe):
        known = state.processors.get(id(module))
        if known is None:
            if not on:
                continue  # never fused: already plain
            unfused = dict(module.attn_processors)
            module.fuse_qkv_projections()
            known = state.processors[id(module)] = (unfused, dict(module.attn_processors))
        # set_attn_processor empties the dict it is given: a copy each time.
        module.set_attn_processor(dict(known[1] if on else known[0]))
    state.fused = on


def _set_channels_last(pipe: Any, state: _State, on: bool) -> None:
    layout = torch.channels_last if on else torch.contiguous_format
    for module in (denoiser_of(pipe), getattr(pipe, "vae", None)):
        if isinstance(module, torch.nn.Module):
            # nn.Module.to takes memory_format at run time; torch's stubs leave it out.
            module_any: Any = module
            module_any.to(memory_format=layout)
    state.channels_last = on


def _set_compiled(module: Any, state: _State, key: str, mode: str | None) -> None:
    if module is None or state.compiled.get(key, _initially_compiled(module)) == mode:
        return
    if mode is None:
        module._compiled_call_impl = None  # what nn.Module.compile set: back to eager
    else:
        # In place: the pipeline keeps the module diffusers expects (adapters, from_pipe).
        module.compile(mode=mode)
    state.compiled[key] = mode


def _initially_compiled(module: Any) -> str | None:
    # A module compiled at load (PipelineCache(compile_unet=True)) in the default mode.
    return "default" if getattr(module, "_compiled_call_impl", None) is not None else None


def _state(pipe: Any) -> _State:
    denoiser = denoiser_of(pipe)
    if denoiser not in _STATES:
        _STATES[denoiser] = _State()
    return _STATES[denoiser]


def prepare(pipe: Any, fast: FastPath) -> None:
    """Leave ``pipe``'s modules in the state ``fast`` needs (a no-op when they are)."""
    if denoiser_of(pipe) is None:
        return  # the null model
    state = _state(pipe)
    if state.channels_last != fast.channels_last:
        _set_channels_last(pipe, state, fast.channels_last)
    if state.fused != fast.fuse_qkv:
        _set_fused(pipe, state, fast.fuse_qkv)
    if (fast.denoiser_mode() or fast.vae_mode()) and fast.cache_dir is not None:
        from worker.compile_cache import use_compile_cache

        use_compile_cache(fast.cache_dir)
    _set_compiled(denoiser_of(pipe), state, "denoiser", fast.denoiser_mode())
    vae = getattr(pipe, "vae", None)
    _set_compiled(getattr(vae, "decoder", None), state, "vae", fast.vae_mode())


@contextlib.contextmanager
def applied_fast_path(pipe: Any, fast: FastPath) -> Iterator[dict[str, Any]]:
    """Run the body with ``fast`` on ``pipe`` (a kind's pipeline made from the cached one
    shares its modules); yields the metadata record. FP8 swaps in a quantised copy of the
    denoiser and DeepCache wraps its deep blocks for the body only."""
    prepare(pipe, fast)
    misses = _compile_misses()
    with contextlib.ExitStack() as stack:
        if fast.fp8:
            stack.enter_context(_fp8_denoiser(pipe))
        if fast.deepcache_interval is not None:
            from worker.deep_cache import DeepCacheUnavailable, deep_cache

            try:
                stack.enter_context(deep_cache(denoiser_of(pipe), fast.deepcache_interval))
            except DeepCacheUnavailable as exc:
                raise BadInputError(f"fast_path.{exc}") from exc
        yield fast.record()
    if fast.cache_dir is not None and _compile_misses() > misses:
        from worker.compile_cache import save_compile_cache

        save_compile_cache(fast.cache_dir)  # what was compiled now is warm after a restart


def _compile_misses() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


@contextlib.contextmanager
def _fp8_denoiser(pipe: Any) -> Iterator[None]:
    from worker.fp8 import quantised_copy

    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    state = _state(pipe)
    original = getattr(pipe, name)
    if state.fp8_copy is None:
        state.fp8_copy = quantised_copy(original, original.device)
    setattr(pipe, name, state.fp8_copy)
    try:
        yield
    finally:
        setattr(pipe, name, original)
