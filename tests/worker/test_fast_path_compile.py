"""torch.compile on the fast path, CPU inductor on the tiny model (one small compile: about a
minute and a half on two cores): the compiled render is the plain one within tolerance, its
kernels land in the settings' cache folder, and a fresh compile finds them there."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from worker.compile_cache import ARTIFACTS_FILE
from worker.fast_path import EXACT_TOLERANCE, PLAIN, FastPath
from worker.loading import load_pipeline
from worker.pipeline import RenderParams, render_batch

PARAMS = RenderParams(
    prompt="a red teapot", negative_prompt="", steps=2, guidance=7.0, width=64, height=64
)


# Inductor imports torch.utils.mkldnn, which uses torch's own deprecated torch.jit API.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_render_is_exact_and_cached_on_disk(
    tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Restored after the test: the fast path points these at the cache folder.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere-triton"))
    torch._dynamo.reset()
    pipe = load_pipeline(str(tiny_model_dir), device=torch.device("cpu"), safety_checker=False)
    cache = tmp_path / "compile-cache"
    fast = FastPath(compile="default", compile_vae=True, cache_dir=cache)

    def render(choice: FastPath) -> np.ndarray:
        rendered = render_batch(pipe, dataclasses.replace(PARAMS, fast_path=choice), [7])
        assert rendered[0].metadata["fast_path"]["compile"] == (choice.compile or "off")
        return np.asarray(rendered[0].image, dtype=np.int16)

    plain = render(PLAIN)
    misses = counters["inductor"]["fxgraph_cache_miss"]
    compiled = render(fast)
    assert counters["inductor"]["fxgraph_cache_miss"] > misses  # it did compile
    assert np.abs(compiled - plain).max() <= EXACT_TOLERANCE
    assert pipe.unet._compiled_call_impl is not None
    assert pipe.vae.decoder._compiled_call_impl is not None
    assert any((cache / "inductor").rglob("*")), "no kernels in the cache folder"
    assert (cache / ARTIFACTS_FILE).stat().st_size > 0

    # A restarted worker: Dynamo's in-memory state gone, the disk cache kept.
    torch._dynamo.reset()
    hits = counters["inductor"]["fxgraph_cache_hit"]
    np.testing.assert_array_equal(render(fast), compiled)
    assert counters["inductor"]["fxgraph_cache_hit"] >= hits + 2  # denoiser and decoder

    # A plain job after it runs eagerly again.
    np.testing.assert_array_equal(render(PLAIN), plain)
    assert pipe.unet._compiled_call_impl is None
    assert pipe.vae.decoder._compiled_call_impl is None
    torch._dynamo.reset()
