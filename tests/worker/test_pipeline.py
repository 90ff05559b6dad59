from __future__ import annotations

import dataclasses
import pathlib
import socket
from typing import Any

import numpy as np
import pytest
import torch

import worker.schedulers
from pixelmill.schedulers import KNOWN_SCHEDULERS, SCHEDULER_LABELS
from worker.loading import (
    NULL_MODEL,
    NullPipeline,
    PipelineCache,
    default_dtype,
    load_pipeline,
    resolve_device,
)
from worker.pipeline import RenderedImage, RenderParams, check_inputs, render_batch, render_seed
from worker.schedulers import apply_scheduler, scheduler_label

CPU = torch.device("cpu")

# torch's Tensor.__array__ has no `copy` parameter, so NumPy 2 warns whenever
# np.array(tensor) is called -- which diffusers' Euler, Euler a and DPM++ schedulers do in
# set_timesteps. Harmless (a copy is made either way) and not fixable from our code.
ignore_numpy_copy_warning = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
PARAMS = RenderParams(
    prompt="a lighthouse at dusk, oil painting",
    negative_prompt="blurry",
    steps=3,
    guidance=7.0,
    width=64,
    height=64,
)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: pathlib.Path) -> Any:
    return load_pipeline(str(tiny_model_dir), device=CPU)


def _pixels(rendered: RenderedImage) -> np.ndarray:
    return np.asarray(rendered.image)


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("network access attempted")


def test_loads_from_disk_offline_and_renders(
    tiny_model_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Stronger than the env var: any attempt to open a connection fails the test.
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)

    pipe = load_pipeline(str(tiny_model_dir), device=CPU)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.device == CPU
    assert pipe.unet.dtype == torch.float32
    assert pipe.safety_checker is not None

    rendered = render_seed(pipe, dataclasses.replace(PARAMS, steps=4), seed=7)
    assert rendered.image.size == (64, 64)
    assert rendered.image.mode == "RGB"
    assert rendered.seed == 7
    assert rendered.nsfw is False  # the tiny checker's random weights do not fire
    assert rendered.seconds > 0
    # A real image, not a blank: random weights still give varied pixels.
    assert _pixels(rendered).std() > 0


@ignore_numpy_copy_warning
def test_same_seed_alone_is_pixel_identical_after_other_renders_and_reloads(
    pipe: Any, tiny_model_dir: pathlib.Path
) -> None:
    sweep = [render_seed(pipe, PARAMS, seed) for seed in (101, 202, 303)]
    # Disturb any state a pipeline could carry: another scheduler, other seeds.
    render_seed(pipe, dataclasses.replace(PARAMS, scheduler="euler_a"), 999)
    alone = render_seed(pipe, PARAMS, 202)
    np.testing.assert_array_equal(_pixels(alone), _pixels(sweep[1]))

    # And on a freshly loaded pipeline, the same seed still gives the same pixels.
    fresh = load_pipeline(str(tiny_model_dir), device=CPU)
    np.testing.assert_array_equal(_pixels(render_seed(fresh, PARAMS, 202)), _pixels(sweep[1]))


def test_different_seeds_differ(pipe: Any) -> None:
    a = _pixels(render_seed(pipe, PARAMS, 1))
    b = _pixels(render_seed(pipe, PARAMS, 2))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("name", "cls", "label"),
    [
        (None, "PNDMScheduler", "PNDMScheduler"),
        ("default", "PNDMScheduler", "PNDMScheduler"),
        ("euler", "EulerDiscreteScheduler", "Euler"),
        ("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
        ("Euler a", "EulerAncestralDiscreteScheduler", "Euler a"),
        ("ddim", "DDIMScheduler", "DDIM"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M"),
        ("DPM++ 2M", "DPMSolverMultistepScheduler", "DPM++ 2M"),
        ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", "DPM++ 2M Karras"),
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", "DPM++ 2M Karras"),
        ("pndm", "PNDMScheduler", "PNDM"),
    ],
)
@ignore_numpy_copy_warning
def test_schedulers_render(pipe: Any, name: str | None, cls: str, label: str) -> None:
    params = dataclasses.replace(PARAMS, scheduler=name, steps=2)
    first = render_seed(pipe, params, 5)
    assert type(pipe.scheduler).__name__ == cls
    assert first.image.size == (64, 64)
    assert scheduler_label(name, pipe=pipe) == label
    # Deterministic per scheduler too (ancestral samplers draw noise from the generator).
    np.testing.assert_array_equal(_pixels(render_seed(pipe, params, 5)), _pixels(first))


def test_karras_flag_and_default_restored(pipe: Any) -> None:
    apply_scheduler(pipe, "dpmpp_2m_karras")
    assert pipe.scheduler.config.use_karras_sigmas is True
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    apply_scheduler(pipe, "dpmpp_2m")
    assert pipe.scheduler.config.use_karras_sigmas is False
    apply_scheduler(pipe, None)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


@ignore_numpy_copy_warning
def test_schedulers_change_the_image(pipe: Any) -> None:
    euler = render_seed(pipe, dataclasses.replace(PARAMS, scheduler="euler"), 5)
    ddim = render_seed(pipe, dataclasses.replace(PARAMS, scheduler="ddim"), 5)
    assert not np.array_equal(_pixels(euler), _pixels(ddim))


def test_every_known_scheduler_can_be_built(pipe: Any) -> None:
    # pixelmill.schedulers lists the names the producer accepts; the worker must build each.
    for name in KNOWN_SCHEDULERS:
        apply_scheduler(pipe, name)
        assert scheduler_label(name, pipe=pipe)
    assert set(worker.schedulers._SCHEDULER_FACTORIES) == set(SCHEDULER_LABELS)


def test_scheduler_label_without_pipe() -> None:
    assert scheduler_label("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert scheduler_label(None) == "default"
    with pytest.raises(ValueError, match="unknown scheduler 'lms'"):
        scheduler_label("lms")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 65}, "width"),
        ({"width": 0}, "width"),
        ({"width": -64}, "width"),
        ({"height": 100}, "height"),
        ({"height": 64.0}, "height"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"guidance": -1.0}, "guidance"),
        ({"guidance": float("nan")}, "guidance"),
        ({"scheduler": "k_lms"}, "scheduler"),
    ],
)
def test_check_inputs_rejects(change: dict[str, object], field: str) -> None:
    bad = dataclasses.replace(PARAMS, **change)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        check_inputs(bad)


def test_check_inputs_accepts_valid() -> None:
    check_inputs(PARAMS)
    check_inputs(dataclasses.replace(PARAMS, guidance=0, steps=1, scheduler="DPM++ 2M Karras"))


def test_unknown_scheduler_lists_known_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        check_inputs(dataclasses.replace(PARAMS, scheduler="heun"))
    for name in ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "pndm"):
        assert name in str(excinfo.value)


def test_render_seed_checks_inputs_first(pipe: Any) -> None:
    with pytest.raises(ValueError, match=r"^width"):
        render_seed(pipe, dataclasses.replace(PARAMS, width=63), 1)


def test_resolve_device() -> None:
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected_auto)
    assert resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    for bad in ("gpu", "cuda:", "cuda:x", "tpu", ""):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)


def test_default_dtype() -> None:
    assert default_dtype(CPU) is torch.float32
    assert default_dtype(torch.device("cuda")) is torch.float16


def test_load_missing_folder_names_it(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_pipeline(str(missing), device=CPU)


def test_load_folder_without_model_index(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        load_pipeline(str(tmp_path), device=CPU)


def test_pipeline_cache_is_lru(tiny_model_dir: pathlib.Path) -> None:
    # Three distinct keys for the same folder: the cache keys on the string it was given.
    a, b, c = str(tiny_model_dir), f"{tiny_model_dir}/", f"{tiny_model_dir}/."
    cache = PipelineCache(device=CPU, max_models=2)
    pipe_a = cache.get(a)
    pipe_b = cache.get(b)
    assert pipe_a is not pipe_b
    assert cache.get(a) is pipe_a  # warm; also makes b the least recently used
    cache.get(c)
    assert len(cache) == 2
    assert a in cache
    assert c in cache
    assert b not in cache
    assert cache.get(b) is not pipe_b  # evicted, so loaded again


def test_pipeline_cache_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="max_models"):
        PipelineCache(device=CPU, max_models=0)


def _initial_latents(pipe: Any, seeds: list[int]) -> torch.Tensor:
    # What render_batch hands the pipeline: one generator per seed.
    generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in seeds]
    unet = pipe.unet
    return pipe.prepare_latents(
        len(seeds), unet.config.in_channels, 64, 64, unet.dtype, pipe.device, generators
    )


def test_batched_seeds_start_from_the_same_noise_as_single_ones(pipe: Any) -> None:
    batch = _initial_latents(pipe, [5, 6, 7])
    for index, seed in enumerate([5, 6, 7]):
        assert torch.equal(batch[index : index + 1], _initial_latents(pipe, [seed]))


@ignore_numpy_copy_warning
@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m_karras"])
def test_batched_render_is_within_one_level_of_single_renders(
    pipe: Any, scheduler: str | None
) -> None:
    params = dataclasses.replace(PARAMS, scheduler=scheduler)
    seeds = [11, 12, 13, 14]
    batch = render_batch(pipe, params, seeds)
    assert [image.seed for image in batch] == seeds
    for rendered in batch:
        alone = render_seed(pipe, params, rendered.seed)
        difference = np.abs(_pixels(alone).astype(np.int16) - _pixels(rendered).astype(np.int16))
        # The same image: PyTorch kernels sum in a batch-size dependent order, so a value may
        # round to the neighbouring 8-bit level (measured: a handful of 12,288 values).
        assert difference.max() <= 1
        assert np.count_nonzero(difference) <= difference.size // 200
    # Each seed still gives its own image.
    assert len({_pixels(image).tobytes() for image in batch}) == len(seeds)


@ignore_numpy_copy_warning
def test_the_same_batch_renders_bit_identically_again(pipe: Any) -> None:
    # What `pixelmill reproduce` relies on: the same seeds in the same batch give the same
    # pixels, whatever was rendered in between.
    seeds = [21, 22, 23]
    first = render_batch(pipe, PARAMS, seeds)
    render_batch(pipe, dataclasses.replace(PARAMS, scheduler="euler_a"), [22])
    again = render_batch(pipe, PARAMS, seeds)
    for before, after in zip(first, again, strict=True):
        np.testing.assert_array_equal(_pixels(before), _pixels(after))


def test_render_batch_rejects_no_seeds(pipe: Any) -> None:
    with pytest.raises(ValueError, match="seeds must not be empty"):
        render_batch(pipe, PARAMS, [])


def test_null_model_renders_flat_images_of_the_requested_size() -> None:
    null = load_pipeline(NULL_MODEL, device=CPU)
    assert isinstance(null, NullPipeline)
    params = dataclasses.replace(PARAMS, width=96, height=32)
    images = render_batch(null, params, [1, 2])  # type: ignore[arg-type]
    assert [image.seed for image in images] == [1, 2]
    for image in images:
        assert image.image.size == (96, 32)
        assert image.nsfw is None
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        render_batch(null, dataclasses.replace(PARAMS, width=30), [1])  # type: ignore[arg-type]


def test_pipeline_cache_records_the_model_identity(
    tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from worker.identity import model_sha256

    cache = PipelineCache(device=CPU, hash_cache=tmp_path / "hashes.json")
    loaded = cache.load(str(tiny_model_dir))
    assert loaded.sha256 == model_sha256(str(tiny_model_dir))
    assert loaded.load_seconds > 0
    assert cache.load(str(tiny_model_dir)) is loaded  # warm: not loaded or hashed again
    assert cache.load(NULL_MODEL).sha256 is None


def test_attention_uses_scaled_dot_product(pipe: Any) -> None:
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}


def test_single_file_needs_a_safetensors_checkpoint(tmp_path: pathlib.Path) -> None:
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"model\.ckpt: single-file models must be \.safetensors"):
        load_pipeline(str(pickle), device=CPU, config=str(tmp_path))
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not loaded either")
    with pytest.raises(ValueError, match=r"model\.safetensors: a single-file checkpoint needs"):
        load_pipeline(str(checkpoint), device=CPU)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable \.safetensors"):
        load_pipeline(str(checkpoint), device=CPU, config=str(tmp_path))
