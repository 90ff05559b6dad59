"""The PNG's "parameters" chunk names every scheduler pixelmill renders with in A1111's own
vocabulary, so A1111's "PNG Info" / paste sets the same sampler and schedule: read back with
sd-parsers and with a port of A1111's own infotext parsing, for every scheduler name a template
accepts (and the default schedulers of the model families)."""

from __future__ import annotations

import io
import pathlib
import re
from typing import Any

import diffusers
import pytest
import torch
from sd_parsers import ParserManager
from sqlalchemy.orm import Session, sessionmaker

from pixelmill.schedulers import KNOWN_SCHEDULERS, SCHEDULER_LABELS, canonical_scheduler
from pixelmill.storage import LocalStorage
from tests.worker.support import images_of, make_job, make_settings
from worker.loading import PipelineCache
from worker.pipeline import job_scheduler
from worker.png import a1111_sampler, read_parameters
from worker.render import WorkerRuntime, render_job

# --- A1111's side, as stable-diffusion-webui 1.9+ reads an infotext ---------------------------
# modules/infotext_utils.py: the settings line is `Key: value` pairs, values JSON-quoted
# where they hold a comma.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

# modules/sd_samplers_*.py: sampler names and the schedule each uses for "Automatic".
A1111_SAMPLERS: dict[str, str | None] = {
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2M SDE": "exponential",
    "DPM++ 2M SDE Heun": "exponential",
    "DPM++ 2S a": "karras",
    "DPM++ 3M SDE": "exponential",
    "Euler a": None,
    "Euler": None,
    "LMS": None,
    "Heun": None,
    "DPM2": "karras",
    "DPM2 a": "karras",
    "DPM fast": None,
    "DPM adaptive": None,
    "Restart": "karras",
    "DDIM": None,
    "DDIM CFG++": None,
    "PLMS": None,
    "UniPC": None,
    "LCM": None,
}
# modules/sd_schedulers.py: (name, label, aliases).
A1111_SCHEDULERS = [
    ("automatic", "Automatic", []),
    ("uniform", "Uniform", []),
    ("karras", "Karras", []),
    ("exponential", "Exponential", []),
    ("polyexponential", "Polyexponential", []),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"]),
    ("kl_optimal", "KL Optimal", []),
    ("align_your_steps", "Align Your Steps", []),
    ("simple", "Simple", []),
    ("normal", "Normal", []),
    ("ddim", "DDIM", []),
    ("beta", "Beta", []),
]
# Before 1.9 (no "Schedule type"): the sampler names, the Karras variants among them.
A1111_LEGACY_SAMPLERS = {
    *(name for name in A1111_SAMPLERS if name not in ("DDIM CFG++",)),
    "LMS Karras",
    "DPM2 Karras",
    "DPM2 a Karras",
    "DPM++ 2S a Karras",
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE Karras",
    "DPM++ 3M SDE Karras",
}


def a1111_settings(parameters: str) -> dict[str, str]:
    """parse_generation_parameters: the last line's settings (prompt lines before it)."""
    *_, last = parameters.strip().split("\n")
    settings = {}
    for key, value in RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = value[1:-1]
        settings[key] = value
    return settings


def a1111_sampler_and_schedule(settings: dict[str, str]) -> tuple[str | None, str]:
    """sd_samplers.get_sampler_and_scheduler: the sampler A1111 picks (None: it knows none and
    would fall back to its default) and the schedule it then uses ("plain": the model's own
    sigmas, as "Automatic" is for a sampler without a preferred schedule, and "Uniform")."""
    name = settings.get("Sampler", "")
    scheduler = settings.get("Schedule type", "Automatic")
    for sched_name, label, aliases in A1111_SCHEDULERS:
        for option in (label, sched_name, *aliases):
            if name.endswith(" " + option):
                scheduler, name = label, name[: -(len(option) + 1)]
                break
    if name not in A1111_SAMPLERS:
        return None, "plain"
    by_label = {label: sched_name for sched_name, label, _ in A1111_SCHEDULERS}
    schedule = by_label.get(scheduler, "automatic")
    if schedule == "automatic":
        schedule = A1111_SAMPLERS[name] or "plain"
    return name, "plain" if schedule == "uniform" else schedule


# --- pixelmill's side -------------------------------------------------------------------------

# Canonical name -> (what A1111 picks, the schedule it uses). The tiny model's own scheduler
# ("default") is PNDM, as Stable Diffusion 1.x's is: A1111's PLMS.
EXPECTED = {
    None: ("PLMS", "plain"),
    "euler": ("Euler", "plain"),
    "euler_a": ("Euler a", "plain"),
    "ddim": ("DDIM", "plain"),
    "dpmpp_2m": ("DPM++ 2M", "plain"),
    "dpmpp_2m_karras": ("DPM++ 2M", "karras"),
    "pndm": ("PLMS", "plain"),
}


def template_names() -> list[str]:
    """Every spelling of a scheduler a template accepts: the canonical names, the A1111
    labels, in any case."""
    names = [*KNOWN_SCHEDULERS, *SCHEDULER_LABELS.values()]
    return sorted({*names, *(name.upper() for name in names)})


def test_the_expectations_cover_every_scheduler_name() -> None:
    assert {canonical_scheduler(name) for name in template_names()} == set(EXPECTED)


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    return PipelineCache(device=torch.device("cpu"))


@pytest.mark.parametrize("name", template_names())
def test_every_template_scheduler_name_is_one_a1111_knows(
    pipelines: PipelineCache, tiny_model_dir: pathlib.Path, name: str
) -> None:
    sampler = a1111_sampler(job_scheduler(pipelines.get(str(tiny_model_dir)), name))
    settings = {"Sampler": sampler.name, "Schedule type": sampler.schedule_type or ""}

    assert a1111_sampler_and_schedule(settings) == EXPECTED[canonical_scheduler(name)]
    # A1111 before 1.9 reads the sampler's name alone.
    assert sampler.name in A1111_LEGACY_SAMPLERS


@pytest.mark.parametrize("scheduler", [name for name in EXPECTED if name is not None] + [None])
def test_rendered_pngs_paste_into_a1111(
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    pipelines: PipelineCache,
    scheduler: str | None,
) -> None:
    settings = make_settings(tiny_model_dir, tmp_path)
    runtime = WorkerRuntime(
        settings=settings,
        sessions=pg_sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        pipelines=pipelines,
        name="a1111-worker",
    )
    job = make_job(db_session, model=str(tiny_model_dir), seeds=[77], scheduler=scheduler)

    assert render_job(runtime, job.id) == "done"

    (image,) = images_of(db_session, job.id)
    png = runtime.storage.get(image.storage_key)
    parameters = read_parameters(png)
    assert parameters is not None
    settings_line = a1111_settings(parameters)
    assert a1111_sampler_and_schedule(settings_line) == EXPECTED[scheduler]
    assert settings_line["Seed"] == "77" and settings_line["Steps"] == "2"
    info = ParserManager().parse(io.BytesIO(png))
    assert info is not None and info.generator.value == "AUTOMATIC1111"
    (parsed,) = info.samplers
    assert parsed.name == settings_line["Sampler"]
    assert parsed.parameters["scheduler"] == settings_line["Schedule type"]
    assert int(parsed.parameters["seed"]) == 77


@pytest.mark.parametrize(
    ("scheduler", "name", "schedule_type", "a1111"),
    [
        # The default schedulers of the model families: SD 1.x, SD 2.x, SDXL.
        (("PNDMScheduler", {"skip_prk_steps": True}), "PLMS", "Automatic", ("PLMS", "plain")),
        (("DDIMScheduler", {}), "DDIM", "Automatic", ("DDIM", "plain")),
        (("EulerDiscreteScheduler", {}), "Euler", "Automatic", ("Euler", "plain")),
        # Others a model folder may name, with their sigma options.
        (
            ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
            "DPM++ 2M Karras",
            "Karras",
            ("DPM++ 2M", "karras"),
        ),
        (
            ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
            "DPM++ 2M SDE",
            "Uniform",
            ("DPM++ 2M SDE", "plain"),
        ),
        (
            ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
            "LMS Karras",
            "Karras",
            ("LMS", "karras"),
        ),
        (
            ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
            "Euler",
            "Karras",
            ("Euler", "karras"),
        ),
        (("HeunDiscreteScheduler", {}), "Heun", "Automatic", ("Heun", "plain")),
        (("KDPM2AncestralDiscreteScheduler", {}), "DPM2 a", "Uniform", ("DPM2 a", "plain")),
        (("UniPCMultistepScheduler", {}), "UniPC", "Automatic", ("UniPC", "plain")),
        (("LCMScheduler", {}), "LCM", "Automatic", ("LCM", "plain")),
        # No A1111 equivalent: the class name, which A1111 does not pretend to know.
        (("DEISMultistepScheduler", {}), "DEISMultistepScheduler", None, (None, "plain")),
        (("DDPMScheduler", {}), "DDPMScheduler", None, (None, "plain")),
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # some constructors' NumPy calls
def test_diffusers_schedulers_in_a1111_vocabulary(
    scheduler: tuple[str, dict[str, Any]],
    name: str,
    schedule_type: str | None,
    a1111: tuple[str | None, str],
) -> None:
    kind, config = scheduler
    sampler = a1111_sampler(getattr(diffusers, kind)(**config))

    assert (sampler.name, sampler.schedule_type) == (name, schedule_type)
    settings = {"Sampler": sampler.name, "Schedule type": sampler.schedule_type or "Automatic"}
    assert a1111_sampler_and_schedule(settings) == a1111
