"""Few-step sampling on the tiny models, CPU: each method's scheduler, one denoiser call per
step without classifier-free guidance, no negative prompt encoded then, TCD's eta, a
distilled LoRA through the adapters, the PNG's record; and a job through render_job."""

from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.job_options import FastPathSpec, JobOptions, LoraRef, SamplingSpec
from db.models import Image, Job, JobStatus
from pixelmill.schedulers import FEW_STEP_RULES, few_step_rule
from pixelmill.storage import LocalStorage
from tests import factories
from tests.worker.support import make_settings
from worker.adapters import file_sha256
from worker.loading import PipelineCache, load_pipeline
from worker.pipeline import RenderParams, classifier_free_guidance, job_scheduler, render_batch
from worker.png import a1111_sampler, read_parameters, read_pixelmill
from worker.render import WorkerRuntime, render_job

CPU = torch.device("cpu")
PARAMS = RenderParams(
    prompt="a red teapot",
    negative_prompt="blurry, text",
    steps=4,
    guidance=0.0,
    width=64,
    height=64,
)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: pathlib.Path) -> Any:
    return load_pipeline(str(tiny_model_dir), device=CPU, safety_checker=False)


def few_step_params(method: str, **changes: Any) -> RenderParams:
    rule = few_step_rule(method)
    sampling = SamplingSpec(
        method=rule.method, eta=rule.eta if rule.schedulers[0] == "tcd" else None
    )
    values: dict[str, Any] = {
        "scheduler": rule.default_scheduler(),
        "steps": rule.default_steps,
        "guidance": rule.guidance,
        "sampling": sampling,
        **changes,
    }
    return dataclasses.replace(PARAMS, **values)


class Calls:
    """Batch sizes of the denoiser's and the text encoder's forwards."""

    def __init__(self, pipe: Any) -> None:
        self.unet: list[int] = []
        self.text: list[int] = []
        self._hooks = [
            pipe.unet.register_forward_pre_hook(lambda _m, a: self.unet.append(a[0].shape[0])),
            pipe.text_encoder.register_forward_pre_hook(
                lambda _m, a, kw: self.text.append((a[0] if a else kw["input_ids"]).shape[0]),
                with_kwargs=True,
            ),
        ]

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *_exc: object) -> None:
        for hook in self._hooks:
            hook.remove()


EXPECTED_SCHEDULERS = {
    "lcm": ("LCMScheduler", None),
    "tcd": ("TCDScheduler", None),
    "lightning": ("EulerDiscreteScheduler", "trailing"),
    "hyper_sd": ("DDIMScheduler", "trailing"),
    "turbo": ("EulerAncestralDiscreteScheduler", "trailing"),
}


def test_the_expectations_cover_every_method() -> None:
    assert set(EXPECTED_SCHEDULERS) == set(FEW_STEP_RULES)


@pytest.mark.parametrize("method", sorted(EXPECTED_SCHEDULERS))
def test_each_method_samples_once_per_step_without_guidance(pipe: Any, method: str) -> None:
    params = few_step_params(method)
    with Calls(pipe) as calls:
        rendered = render_batch(pipe, params, [1, 2])
    cls, spacing = EXPECTED_SCHEDULERS[method]
    assert type(pipe.scheduler).__name__ == cls
    if spacing is not None:
        assert pipe.scheduler.config.timestep_spacing == spacing
    # One denoiser call per step, of the batch alone: no unconditional half.
    assert calls.unet == [2] * params.steps
    # The prompts only: the negative prompt is not encoded.
    assert calls.text == [2]
    assert rendered[0].metadata["classifier_free_guidance"] is False
    assert rendered[0].metadata["sampling"]["method"] == method
    assert rendered[0].image.size == (64, 64)


def test_guidance_above_one_runs_the_unconditional_pass(pipe: Any) -> None:
    params = few_step_params("lcm", guidance=2.0)
    with Calls(pipe) as calls:
        rendered = render_batch(pipe, params, [1, 2])
    assert calls.unet == [4] * params.steps
    assert calls.text == [2, 2]  # prompts and negative prompts
    assert rendered[0].metadata["classifier_free_guidance"] is True


def test_guidance_one_skips_the_negative_prompt(pipe: Any) -> None:
    params = few_step_params("lcm", guidance=1.0)
    with_negative = render_batch(pipe, params, [3])
    without = render_batch(pipe, dataclasses.replace(params, negative_prompt=""), [3])
    np.testing.assert_array_equal(np.asarray(with_negative[0].image), np.asarray(without[0].image))


def test_tcd_eta_reaches_the_scheduler(pipe: Any) -> None:
    def image(eta: float) -> np.ndarray:
        params = few_step_params("tcd", sampling=SamplingSpec(method="tcd", eta=eta))
        return np.asarray(render_batch(pipe, params, [4])[0].image, dtype=np.int16)

    # gamma 0 is deterministic multistep; gamma 0.9 re-noises each step from the generator.
    assert np.abs(image(0.0) - image(0.9)).max() > 0
    np.testing.assert_array_equal(image(0.3), image(0.3))


def test_lcm_distilled_unet_embeds_guidance(tmp_path: pathlib.Path, pipe: Any) -> None:
    """An LCM-distilled UNet takes the guidance as an input (time_cond_proj_dim): diffusers
    runs no unconditional pass whatever the guidance, and neither does the negative prompt."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 32})
    folder = tmp_path / "tiny-lcm"
    type(pipe)(**{**pipe.components, "unet": unet}).save_pretrained(folder)
    distilled = load_pipeline(str(folder), device=CPU, safety_checker=False)
    params = few_step_params("lcm", guidance=8.0)
    assert classifier_free_guidance(distilled, params) is False
    with Calls(distilled) as calls:
        rendered = render_batch(distilled, params, [1])
    assert calls.unet == [1] * params.steps and calls.text == [1]
    assert rendered[0].metadata["classifier_free_guidance"] is False


def test_distilled_lora_loads_through_the_adapters(pipe: Any, tiny_lora_path: pathlib.Path) -> None:
    lora = LoraRef(path=str(tiny_lora_path), scale=1.0, sha256=file_sha256(tiny_lora_path))
    params = few_step_params("lightning")
    plain = np.asarray(render_batch(pipe, params, [5])[0].image, dtype=np.int16)
    with_lora = render_batch(pipe, dataclasses.replace(params, loras=(lora,)), [5])
    assert np.abs(np.asarray(with_lora[0].image, dtype=np.int16) - plain).max() > 10
    again = np.asarray(render_batch(pipe, params, [5])[0].image, dtype=np.int16)
    np.testing.assert_array_equal(again, plain)  # and it is gone after


@pytest.mark.parametrize(
    ("scheduler", "name", "schedule"),
    [
        ("lcm", "LCM", "Automatic"),
        ("tcd", "TCD", "Automatic"),
        ("euler_trailing", "Euler", "SGM Uniform"),
        ("euler_a_trailing", "Euler a", "SGM Uniform"),
        ("ddim_trailing", "DDIM", "SGM Uniform"),
    ],
)
def test_a1111_names_the_few_step_samplers(
    pipe: Any, scheduler: str, name: str, schedule: str
) -> None:
    sampler = a1111_sampler(job_scheduler(pipe, scheduler))
    assert (sampler.name, sampler.schedule_type) == (name, schedule)


# --- through render_job -------------------------------------------------------------------


def test_few_step_job_with_fast_path_through_the_worker(
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    tiny_lora_path: pathlib.Path,
) -> None:
    settings = make_settings(tiny_model_dir, tmp_path)
    runtime = WorkerRuntime(
        settings=settings,
        sessions=pg_sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        pipelines=PipelineCache(device=CPU),
        name="test-worker",
    )
    lora = LoraRef(path=str(tiny_lora_path), scale=1.0, sha256=file_sha256(tiny_lora_path))
    options = JobOptions(
        loras=(lora,),
        sampling=SamplingSpec(method="hyper_sd"),
        fast_path=FastPathSpec(deepcache_interval=2),
    )
    job = factories.make_job(
        db_session,
        item=factories.make_item(db_session, fields={"name": "teapot"}),
        template="fast",
        prompt="a teapot",
        negative_prompt="blurry",
        model=str(tiny_model_dir),
        scheduler="ddim_trailing",
        steps=4,
        guidance=0.0,
        width=64,
        height=64,
        seeds=(1, 2),
        options=options.to_json(),
    )
    assert render_job(runtime, job.id) == "done"
    db_session.expire_all()
    row = db_session.get(Job, job.id)
    assert row is not None and row.status == JobStatus.DONE
    images = db_session.scalars(select(Image).where(Image.job_id == job.id)).all()
    assert len(images) == 2
    png = runtime.storage.get(images[0].storage_key)
    record = read_pixelmill(png)
    assert record is not None
    assert record["sampling"] == {"method": "hyper_sd"}
    assert record["classifier_free_guidance"] is False
    assert record["approximate"] is True
    fast = record["fast_path"]
    assert fast["deepcache_interval"] == 2 and fast["channels_last"] is True
    assert fast["fuse_qkv"] is False  # the job has a LoRA
    parameters = read_parameters(png)
    assert parameters is not None
    assert "Sampler: DDIM, Schedule type: SGM Uniform" in parameters
    with PIL.Image.open(io.BytesIO(png)) as image:
        assert image.size == (64, 64)
