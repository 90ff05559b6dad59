"""SDXL through the worker's loading and rendering path, on the tiny SDXL model."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from worker.loading import load_pipeline
from worker.pipeline import RenderParams, render_batch

CPU = torch.device("cpu")


def _params(**changes: object) -> RenderParams:
    values: dict[str, object] = {
        "prompt": "a ceramic teapot, product photo",
        "negative_prompt": "blurry, watermark",
        "steps": 3,
        "guidance": 5.0,
        "width": 64,
        "height": 64,
    }
    values.update(changes)
    return RenderParams(**values)  # type: ignore[arg-type]


def _pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_model_dir: pathlib.Path) -> object:
    return load_pipeline(str(tiny_sdxl_model_dir), device=CPU)


def test_a_folder_loads_as_sdxl(sdxl_pipe: object) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )

    assert isinstance(sdxl_pipe, StableDiffusionXLPipeline)
    assert sdxl_pipe.device == CPU
    assert sdxl_pipe.unet.dtype == torch.float32  # float32 on CPU


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64), (64, 128)])
def test_renders_the_requested_size_without_a_safety_verdict(
    sdxl_pipe: object, width: int, height: int
) -> None:
    rendered = render_batch(sdxl_pipe, _params(width=width, height=height), [1, 2])  # type: ignore[arg-type]
    assert [image.seed for image in rendered] == [1, 2]
    for image in rendered:
        assert image.image.size == (width, height)
        assert image.image.mode == "RGB"
        # SDXL has no safety checker: "not checked" (None), never "checked and clean".
        assert image.nsfw is None
        assert image.seconds > 0
    # Different seeds, different images (and neither is blank).
    first, second = (_pixels(image.image) for image in rendered)
    assert not np.array_equal(first, second)
    assert float(first.std()) > 5


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m_karras"])
def test_same_seed_same_pixels(sdxl_pipe: object, scheduler: str | None) -> None:
    params = _params(scheduler=scheduler)
    first = render_batch(sdxl_pipe, params, [7, 8])  # type: ignore[arg-type]
    # Something else in between: a render must not leak state into the next one.
    render_batch(sdxl_pipe, _params(prompt="a wooden chair", steps=2), [99])  # type: ignore[arg-type]
    again = render_batch(sdxl_pipe, params, [7, 8])  # type: ignore[arg-type]
    for before, after in zip(first, again, strict=True):
        assert before.seed == after.seed
        assert np.array_equal(_pixels(before.image), _pixels(after.image)), before.seed


def test_the_prompt_reaches_the_image(sdxl_pipe: object) -> None:
    # Both text encoders feed the UNet: another prompt, same seed, other pixels.
    teapot = render_batch(sdxl_pipe, _params(), [3])[0]  # type: ignore[arg-type]
    chair = render_batch(sdxl_pipe, _params(prompt="a wooden chair"), [3])[0]  # type: ignore[arg-type]
    assert not np.array_equal(_pixels(teapot.image), _pixels(chair.image))
