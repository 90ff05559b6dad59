"""The fast path on the tiny model, CPU: each option's pixels against the plain render, the
pipeline left as the next job needs it, the choice per settings/model/template, DeepCache's
skipped work, FP8's refusal here, the batch-size probe and the dedupe key."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
import pydantic
import pytest
import torch

from db.job_options import FastPathSpec, JobOptions, LoraRef, SamplingSpec
from pixelmill.errors import BadInputError
from pixelmill.identity import dedupe_key
from pixelmill.settings import Settings
from tests.worker.support import make_settings
from worker.adapters import file_sha256
from worker.batch_probe import batch_size, largest_fitting_batch
from worker.fast_path import EXACT_TOLERANCE, PLAIN, FastPath, job_fast_path, prepare
from worker.fp8 import Fp8Unavailable, fp8_unavailable
from worker.loading import load_pipeline
from worker.pipeline import RenderParams, render_batch

CPU = torch.device("cpu")
PARAMS = RenderParams(
    prompt="a red teapot", negative_prompt="blurry", steps=4, guidance=7.0, width=64, height=64
)
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: pathlib.Path) -> Any:
    return load_pipeline(str(tiny_model_dir), device=CPU, safety_checker=False)


def pixels(rendered: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(image.image, dtype=np.int16) for image in rendered])


def render(pipe: Any, fast: FastPath | None, **changes: Any) -> list[Any]:
    return render_batch(pipe, dataclasses.replace(PARAMS, fast_path=fast, **changes), SEEDS)


def assert_plain_modules(pipe: Any) -> None:
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "fast",
    [
        FastPath(channels_last=True),
        FastPath(fuse_qkv=True),
        FastPath(channels_last=True, fuse_qkv=True),
    ],
    ids=["channels_last", "fuse_qkv", "both"],
)
def test_exact_options_render_the_plain_pixels_within_tolerance(pipe: Any, fast: FastPath) -> None:
    plain = pixels(render(pipe, None))
    rendered = render(pipe, fast)
    assert np.abs(pixels(rendered) - plain).max() <= EXACT_TOLERANCE
    record = rendered[0].metadata["fast_path"]
    assert record["channels_last"] is fast.channels_last
    assert record["fuse_qkv"] is fast.fuse_qkv
    assert rendered[0].metadata["approximate"] is False
    # The modules are in the fast path's state now...
    if fast.fuse_qkv:
        assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {
            "FusedAttnProcessor2_0"
        }
    if fast.channels_last:
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # ... and a plain job puts them back and renders exactly what it did before.
    np.testing.assert_array_equal(pixels(render(pipe, None)), plain)
    assert_plain_modules(pipe)


def test_fused_state_is_kept_between_jobs_and_toggled(pipe: Any) -> None:
    fused = FastPath(fuse_qkv=True)
    first = pixels(render(pipe, fused))
    attention = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    projection = attention.to_qkv
    np.testing.assert_array_equal(pixels(render(pipe, fused)), first)
    prepare(pipe, PLAIN)
    prepare(pipe, fused)
    assert attention.to_qkv is projection  # fused once, not again per job
    prepare(pipe, PLAIN)


def test_lora_jobs_render_unfused(
    pipe: Any, tiny_lora_path: pathlib.Path, tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """A fused attention would bypass the LoRA layers on to_q/to_k/to_v: a job with LoRAs gets
    the separate projections, and its pixels are the LoRA's."""
    lora = LoraRef(path=str(tiny_lora_path), scale=1.0, sha256=file_sha256(tiny_lora_path))
    settings = make_settings(tiny_model_dir, tmp_path)
    fast = job_fast_path(settings, str(tiny_model_dir), JobOptions(loras=(lora,)), CPU)
    assert fast.fuse_qkv is False and fast.channels_last is True
    with_lora = pixels(render(pipe, None, loras=(lora,)))
    rendered = render(pipe, fast, loras=(lora,))
    assert np.abs(pixels(rendered) - with_lora).max() <= EXACT_TOLERANCE
    assert rendered[0].metadata["fast_path"]["fuse_qkv"] is False
    assert np.abs(with_lora - pixels(render(pipe, None))).max() > 10  # the LoRA did something
    prepare(pipe, PLAIN)


# --- DeepCache --------------------------------------------------------------------------------


def test_deepcache_skips_the_deep_blocks_between_full_steps(pipe: Any) -> None:
    calls = {"mid": 0, "outer": 0}
    hooks = [
        # Inside the blocks: what ran, not what was called (a cached block is called too).
        pipe.unet.mid_block.resnets[0].register_forward_hook(
            lambda *_: calls.__setitem__("mid", calls["mid"] + 1)
        ),
        pipe.unet.up_blocks[-1]
        .resnets[0]
        .register_forward_hook(lambda *_: calls.__setitem__("outer", calls["outer"] + 1)),
    ]
    try:
        plain = pixels(render(pipe, None, steps=6, scheduler="ddim"))
        assert calls == {"mid": 6, "outer": 6}
        calls.update(mid=0, outer=0)
        rendered = render(pipe, FastPath(deepcache_interval=3), steps=6, scheduler="ddim")
    finally:
        for hook in hooks:
            hook.remove()
    # Full UNet on steps 0 and 3; the outermost blocks every step.
    assert calls == {"mid": 2, "outer": 6}
    # Approximate: the README has the measured figures.
    assert np.abs(pixels(rendered) - plain).max() > 0
    assert rendered[0].metadata["approximate"] is True
    assert rendered[0].metadata["fast_path"]["deepcache_interval"] == 3
    assert rendered[0].metadata["fast_path"]["compile"] == "off"
    # The UNet is the plain one again.
    assert "forward" not in vars(pipe.unet.mid_block)
    np.testing.assert_array_equal(pixels(render(pipe, None, steps=6, scheduler="ddim")), plain)


def test_deepcache_reuse_reproduces_the_full_unet_on_the_same_input(pipe: Any) -> None:
    """A reused step computes the outer blocks afresh around the kept deep features: on the
    input that produced them, that is the full UNet's output."""
    from worker.deep_cache import deep_cache

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    context = torch.randn((2, 77, 32), generator=generator)
    timestep = torch.tensor(500)
    with torch.no_grad():
        full = pipe.unet(latents, timestep, context).sample
        with deep_cache(pipe.unet, 2) as state:
            first = pipe.unet(latents, timestep, context).sample
            reused = pipe.unet(latents, timestep, context).sample
            moved = pipe.unet(latents * 0.9, timestep, context).sample
    assert (state.calls, state.full_steps) == (3, 2)
    torch.testing.assert_close(first, full)
    torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(moved, full)


def test_deepcache_needs_a_unet(pipe: Any) -> None:
    from worker.deep_cache import DeepCacheUnavailable, deep_cache

    with pytest.raises(DeepCacheUnavailable, match="needs a UNet2DConditionModel"):
        deep_cache(pipe.vae, 3).__enter__()
    with pytest.raises(ValueError, match="interval must be >= 2"), deep_cache(pipe.unet, 1):
        pass


# --- FP8 ------------------------------------------------------------------------------------


def test_fp8_is_refused_where_it_cannot_run(
    tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    reason = fp8_unavailable(CPU)
    assert reason is not None  # this machine: no torchao and no Hopper GPU
    assert reason.startswith("fp8: ")
    assert ("torchao" in reason) or ("SM 9.0" in reason)
    settings = make_settings(tiny_model_dir, tmp_path)
    options = JobOptions(fast_path=FastPathSpec(fp8=True))
    with pytest.raises(Fp8Unavailable) as err:
        job_fast_path(settings, str(tiny_model_dir), options, CPU)
    assert isinstance(err.value, BadInputError)  # the job fails at once, with the reason
    assert str(err.value) == reason


def test_fp8_quantised_copy_refuses_without_hopper(pipe: Any) -> None:
    from worker.fp8 import quantised_copy

    with pytest.raises(Fp8Unavailable, match="fp8: "):
        quantised_copy(pipe.unet, CPU)


# --- the choice -------------------------------------------------------------------------------


def test_choice_from_settings_model_and_template(
    tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    model = str(tiny_model_dir)
    settings = make_settings(tiny_model_dir, tmp_path)
    default = job_fast_path(settings, model, JobOptions(), CPU)
    # Exact options on by default; not compiled on CPU ("auto").
    assert (default.channels_last, default.fuse_qkv, default.compile) == (True, True, None)
    assert default.cache_dir == (tmp_path / "data" / "compile-cache").resolve()
    assert job_fast_path(settings, model, JobOptions(), torch.device("cuda")).compile == (
        "max-autotune-no-cudagraphs"
    )
    per_model = make_settings(
        tiny_model_dir,
        tmp_path,
        fast_path_models={model: {"fuse_qkv": False, "compile": "default"}},
    )
    chosen = job_fast_path(per_model, model, JobOptions(), CPU)
    assert (chosen.fuse_qkv, chosen.compile) == (False, "default")
    assert job_fast_path(per_model, "other-model", JobOptions(), CPU).fuse_qkv is True
    template = JobOptions(
        fast_path=FastPathSpec(fuse_qkv=True, compile="off", deepcache_interval=2)
    )
    chosen = job_fast_path(per_model, model, template, CPU)
    assert (chosen.fuse_qkv, chosen.compile, chosen.deepcache_interval) == (True, None, 2)
    legacy = make_settings(tiny_model_dir, tmp_path, torch_compile=True)
    assert job_fast_path(legacy, model, JobOptions(), CPU).compile == "default"


def test_per_model_settings_take_only_exact_options(
    tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(pydantic.ValidationError, match="per-model options are channels_last"):
        make_settings(tiny_model_dir, tmp_path, fast_path_models={"m": {"fp8": True}})
    with pytest.raises(pydantic.ValidationError, match="compile='fast'"):
        make_settings(tiny_model_dir, tmp_path, fast_path_models={"m": {"compile": "fast"}})


def test_dedupe_key_covers_only_the_options_that_change_pixels() -> None:
    job = {
        "model": "m",
        "scheduler": None,
        "steps": 4,
        "guidance": 0.0,
        "width": 64,
        "height": 64,
        "prompt": "p",
        "negative_prompt": "",
        "seeds": [1],
    }

    def key(options: JobOptions) -> str:
        return dedupe_key({**job, "options": options.to_json()})

    plain = dedupe_key(job)
    exact = JobOptions(
        fast_path=FastPathSpec(channels_last=False, fuse_qkv=True, compile="default")
    )
    assert key(exact) == plain
    assert key(JobOptions(fast_path=FastPathSpec(deepcache_interval=3))) != plain
    assert key(JobOptions(fast_path=FastPathSpec(fp8=True))) != plain
    assert key(JobOptions(fast_path=FastPathSpec(deepcache_interval=3))) != key(
        JobOptions(fast_path=FastPathSpec(deepcache_interval=2))
    )
    assert key(JobOptions(sampling=SamplingSpec(method="lcm"))) != plain


# --- batch size ----------------------------------------------------------------------------


def test_batch_size_on_cpu_is_the_configured_one(
    pipe: Any, tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    settings = make_settings(tiny_model_dir, tmp_path, render_batch_size=3)
    assert batch_size(pipe, PARAMS, settings) == 3


def test_memory_probe_keeps_the_largest_batch_that_fits() -> None:
    per_image, fixed = 3_000, 10_000

    def peak(batch: int) -> int:
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return fixed + per_image * batch

    tried: list[int] = []

    def recording(batch: int) -> int:
        tried.append(batch)
        return peak(batch)

    # Budget for 8 images (34 000 bytes) but not 16 (58 000).
    assert largest_fitting_batch(recording, budget_bytes=40_000, limit=32) == 8
    assert tried == [1, 2, 4, 8, 16]
    assert largest_fitting_batch(peak, budget_bytes=10**9, limit=32) == 16  # 32 runs out
    assert largest_fitting_batch(peak, budget_bytes=10**9, limit=12) == 12
    assert largest_fitting_batch(peak, budget_bytes=1, limit=32) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_memory_probe_on_cuda(tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cuda = torch.device("cuda")
    pipe = load_pipeline(str(tiny_model_dir), device=cuda, safety_checker=False)
    settings = make_settings(tiny_model_dir, tmp_path, device="cuda", render_batch_max=8)
    assert 1 <= batch_size(pipe, PARAMS, settings) <= 8


def test_settings_defaults_are_exact_options() -> None:
    settings = Settings()
    assert settings.fast_path_channels_last and settings.fast_path_fuse_qkv
    assert settings.fast_path_compile == "auto"
