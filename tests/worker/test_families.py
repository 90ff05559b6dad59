"""SD3 and FLUX.1 through render_job on real Postgres: tiny random pipelines built in code,
saved with save_pretrained and loaded by the worker's own cache, rendered into storage with
their family in the metadata, checked by the separate safety step, image-to-image, and the
inputs each family refuses failing the job with the field named; FLUX's true CFG reading the
job's negative prompt."""

from __future__ import annotations

import io
import pathlib
import shutil
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.job_options import JobOptions
from db.models import Image, Job, JobStatus
from pixelmill.identity import dedupe_key
from pixelmill.settings import Settings
from pixelmill.storage import LocalStorage
from pixelmill.thumbnails import QUARANTINE_PREFIX
from tests import factories
from tests.worker.flagging_model import make_flagging_model
from tests.worker.test_render_kinds import png_bytes, product_png, stage
from worker.families import FamilyOptions
from worker.loading import PipelineCache
from worker.png import read_parameters, read_pixelmill
from worker.render import WorkerRuntime, render_job
from worker.tiny_families import FAMILY_ARCHITECTURES, build_tiny_family

W, H = 64, 48  # multiples of 16, as both families need
# What each tiny folder is, as the image's metadata names it.
VARIANTS = {
    "sd3": ("sd3", "3-medium"),
    "flux": ("flux", "dev"),
    "flux-schnell": ("flux", "schnell"),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("families")
    return {arch: build_tiny_family(root / arch, arch=arch) for arch in FAMILY_ARCHITECTURES}


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    return PipelineCache(device=torch.device("cpu"), max_models=3)


def make_runtime(
    tmp_path: pathlib.Path, sessions: sessionmaker[Session], pipelines: PipelineCache
) -> WorkerRuntime:
    settings = Settings(  # type: ignore[call-arg]
        model="tiny",
        device="cpu",
        storage="local",
        storage_dir=tmp_path / "images",
        data_dir=tmp_path / "data",
    )
    return WorkerRuntime(
        settings=settings,
        sessions=sessions,
        storage=LocalStorage(settings.resolved_storage_dir),
        pipelines=pipelines,
        name="family-worker",
    )


@pytest.fixture
def runtime(
    tmp_path: pathlib.Path, pg_sessions: sessionmaker[Session], pipelines: PipelineCache
) -> WorkerRuntime:
    return make_runtime(tmp_path, pg_sessions, pipelines)


def family_job(session: Session, model: pathlib.Path, arch: str, **overrides: Any) -> Job:
    """A job each family accepts: no negative prompt for FLUX, no guidance for schnell."""
    values: dict[str, Any] = {
        "template": "studio",
        "prompt": "a red sneaker on a marble table",
        "negative_prompt": "blurry" if arch == "sd3" else "",
        "model": str(model),
        "steps": 3,
        "guidance": 0.0 if arch == "flux-schnell" else 3.5,
        "width": W,
        "height": H,
        "seeds": (1, 2),
        **overrides,
    }
    return factories.make_job(
        session, item=factories.make_item(session, fields={"name": "sneaker"}), **values
    )


def stored(session: Session, runtime: WorkerRuntime, job: Job) -> list[tuple[Image, bytes]]:
    session.expire_all()
    rows = session.scalars(select(Image).where(Image.job_id == job.id).order_by(Image.seed))
    return [(row, runtime.storage.get(row.storage_key)) for row in rows]


def pixels(png: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def outcome(session: Session, job: Job) -> tuple[str, str | None]:
    session.expire_all()
    row = session.get(Job, job.id)
    assert row is not None
    return row.status, row.error


# --- text to image ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_each_family_renders_into_storage_with_its_family_recorded(
    runtime: WorkerRuntime,
    db_session: Session,
    family_dirs: dict[str, pathlib.Path],
    arch: str,
) -> None:
    model = family_dirs[arch]
    job = family_job(db_session, model, arch)
    assert render_job(runtime, job.id) == "done"
    images = stored(db_session, runtime, job)
    assert [row.seed for row, _ in images] == [1, 2]
    name, variant = VARIANTS[arch]
    for row, png in images:
        assert pixels(png).shape == (H, W, 3)
        assert row.safety == "safe"  # the folder's own checker ran, as a step of its own
        assert row.model_sha256 is not None and len(row.model_sha256) == 64
        chunk = read_pixelmill(png)
        assert chunk is not None
        assert chunk["model"] == str(model)
        assert chunk["family"] == {
            "name": name,
            "variant": variant,
            "dtype": "float32",  # CPU; bfloat16 on CUDA
            "t5": "float32",
            "offload": "none",
            "safety": "model",
        }
        assert chunk["safety"]["status"] == "safe"
        parameters = read_parameters(png)
        assert parameters is not None
        assert f"Seed: {row.seed}, Size: {W}x{H}, " in parameters
        assert f"Model: {model}, " in parameters
        assert ("Negative prompt: blurry" in parameters) == (arch == "sd3")
    # Different seeds, different noise: the model really rendered.
    assert not np.array_equal(pixels(images[0][1]), pixels(images[1][1]))


def test_families_have_their_own_dedupe_keys_and_pixels(
    runtime: WorkerRuntime, db_session: Session, family_dirs: dict[str, pathlib.Path]
) -> None:
    """The dedupe key covers the model, so the same prompt, seeds and settings on another
    family is another job; and its pixels are another model's."""
    columns = {
        "scheduler": None,
        "steps": 3,
        "guidance": 3.5,
        "width": W,
        "height": H,
        "prompt": "a red sneaker",
        "negative_prompt": "",
        "seeds": [1],
    }
    keys = {
        arch: dedupe_key({**columns, "model": str(family_dirs[arch])}) for arch in ("sd3", "flux")
    }
    assert keys["sd3"] != keys["flux"]
    rendered = {}
    for arch in ("sd3", "flux"):
        job = family_job(
            db_session,
            family_dirs[arch],
            arch,
            prompt="a red sneaker",
            negative_prompt="",
            seeds=(1,),
        )
        assert render_job(runtime, job.id) == "done"
        ((_, png),) = stored(db_session, runtime, job)
        rendered[arch] = pixels(png)
    assert not np.array_equal(rendered["sd3"], rendered["flux"])


def test_a_family_render_is_reproducible(
    runtime: WorkerRuntime, db_session: Session, family_dirs: dict[str, pathlib.Path]
) -> None:
    """Same (model, params, seed) -> the same pixels, rendered alone or in a sweep."""
    sweep = family_job(db_session, family_dirs["flux"], "flux", seeds=(1, 2, 3))
    alone = family_job(db_session, family_dirs["flux"], "flux", seeds=(2,))
    assert render_job(runtime, sweep.id) == render_job(runtime, alone.id) == "done"
    by_seed = {row.seed: pixels(png) for row, png in stored(db_session, runtime, sweep)}
    ((_, png),) = stored(db_session, runtime, alone)
    difference = np.abs(by_seed[2] - pixels(png))
    assert difference.max() <= 1  # batched kernels may round one level differently


def test_a_flux_job_with_true_cfg_renders_its_negative_prompt(
    runtime: WorkerRuntime, db_session: Session, family_dirs: dict[str, pathlib.Path]
) -> None:
    """The job's options carry the true CFG scale to the pipeline: the negative prompt is
    read (other pixels than the plain job of the same seed) and the metadata says so."""
    model = family_dirs["flux"]
    guided = family_job(
        db_session,
        model,
        "flux",
        negative_prompt="blurry",
        seeds=(4,),
        options=JobOptions(true_cfg=4.0).to_json(),
    )
    plain = family_job(db_session, model, "flux", seeds=(4,))
    assert render_job(runtime, guided.id) == render_job(runtime, plain.id) == "done"
    ((_, png),) = stored(db_session, runtime, guided)
    ((_, plain_png),) = stored(db_session, runtime, plain)
    assert not np.array_equal(pixels(png), pixels(plain_png))
    chunk = read_pixelmill(png)
    assert chunk is not None
    assert chunk["true_cfg"] == 4.0 and chunk["classifier_free_guidance"] is True
    plain_chunk = read_pixelmill(plain_png)
    assert plain_chunk is not None
    assert "true_cfg" not in plain_chunk and plain_chunk["classifier_free_guidance"] is False
    parameters = read_parameters(png)
    assert parameters is not None and "Negative prompt: blurry" in parameters
    # As Forge writes FLUX.1's: the true CFG scale, and the model's own guidance input.
    assert "CFG scale: 4.0, " in parameters
    assert f"Distilled CFG Scale: {float(guided.guidance)}, " in parameters
    plain_parameters = read_parameters(plain_png)
    assert plain_parameters is not None and "CFG scale: 1.0, " in plain_parameters


# --- the separate safety step -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_the_safety_step_flags_images_of_models_without_a_checker_slot(
    tmp_path: pathlib.Path,
    runtime: WorkerRuntime,
    db_session: Session,
    family_dirs: dict[str, pathlib.Path],
    arch: str,
) -> None:
    flagging = make_flagging_model(family_dirs[arch], tmp_path / "flagging")
    job = family_job(db_session, flagging, arch)
    assert render_job(runtime, job.id) == "done"
    images = stored(db_session, runtime, job)
    assert len(images) == 2
    for row, png in images:
        assert row.safety == "flagged"
        assert row.storage_key.startswith(QUARANTINE_PREFIX)
        chunk = read_pixelmill(png)
        assert chunk is not None and chunk["safety"]["status"] == "flagged"
        # Kept for review as rendered, not blacked out.
        assert pixels(png).max() > 0


def checker_folder(source: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A checker laid out as CompVis/stable-diffusion-safety-checker is: both files at the
    root of one folder."""
    shutil.copytree(source / "safety_checker", out)
    shutil.copy(source / "feature_extractor" / "preprocessor_config.json", out)
    return out


def without_checker(model: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    shutil.copytree(
        model, out, ignore=shutil.ignore_patterns("safety_checker", "feature_extractor")
    )
    return out


def test_a_configured_checker_runs_for_a_model_without_one(
    tmp_path: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    db_session: Session,
    family_dirs: dict[str, pathlib.Path],
) -> None:
    flagging = make_flagging_model(family_dirs["flux"], tmp_path / "flagging")
    checker = checker_folder(flagging, tmp_path / "checker")
    bare = without_checker(family_dirs["flux"], tmp_path / "bare")
    configured = PipelineCache(
        device=torch.device("cpu"),
        family_options=FamilyOptions(safety_checker_model=str(checker)),
    )
    runtime = make_runtime(tmp_path, pg_sessions, configured)
    job = family_job(db_session, bare, "flux")
    assert render_job(runtime, job.id) == "done"
    for row, png in stored(db_session, runtime, job):
        assert row.safety == "flagged"
        chunk = read_pixelmill(png)
        assert chunk is not None and chunk["family"]["safety"] == str(checker)

    # Without any checker the images are recorded as unchecked, never as safe.
    unchecked_runtime = make_runtime(
        tmp_path, pg_sessions, PipelineCache(device=torch.device("cpu"))
    )
    job = family_job(db_session, bare, "flux")
    assert render_job(unchecked_runtime, job.id) == "done"
    for row, png in stored(db_session, unchecked_runtime, job):
        assert row.safety == "unchecked"
        chunk = read_pixelmill(png)
        assert chunk is not None and "safety" not in chunk["family"]


def test_a_missing_configured_checker_stops_the_worker_at_start(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"PIXELMILL_SAFETY_CHECKER_MODEL: .*neither a folder nor"):
        PipelineCache(
            device=torch.device("cpu"),
            family_options=FamilyOptions(safety_checker_model=str(tmp_path / "nowhere")),
        )


# --- image to image ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_img2img_for_both_families(
    runtime: WorkerRuntime,
    db_session: Session,
    family_dirs: dict[str, pathlib.Path],
    arch: str,
) -> None:
    model = family_dirs[arch]
    image = stage(db_session, runtime, product_png())
    low = family_job(
        db_session,
        model,
        arch,
        kind="img2img",
        input_image=image,
        seeds=(5,),
        steps=4,
        options=JobOptions(strength=0.5).to_json(),
    )
    text = family_job(db_session, model, arch, seeds=(5,), steps=4)
    assert render_job(runtime, low.id) == render_job(runtime, text.id) == "done"
    ((row, png),) = stored(db_session, runtime, low)
    ((_, text_png),) = stored(db_session, runtime, text)
    # At the job's size (the families' pipelines would otherwise resize to 1024), and
    # started from the product photo: not the text-to-image render of the same seed.
    assert (row.width, row.height) == (W, H) and pixels(png).shape == (H, W, 3)
    assert not np.array_equal(pixels(png), pixels(text_png))
    chunk = read_pixelmill(png)
    assert chunk is not None
    assert chunk["kind"] == "img2img" and chunk["strength"] == 0.5
    assert chunk["family"]["name"] == VARIANTS[arch][0]
    parameters = read_parameters(png)
    assert parameters is not None and ", Denoising strength: 0.5, " in parameters


def test_img2img_follows_the_input_image(
    runtime: WorkerRuntime, db_session: Session, family_dirs: dict[str, pathlib.Path]
) -> None:
    """Two different photos at low strength give two different images (same seed)."""
    model = family_dirs["sd3"]
    results = []
    for colour in ((250, 10, 10), (10, 10, 250)):
        image = stage(db_session, runtime, png_bytes(PIL.Image.new("RGB", (96, 72), colour)))
        job = family_job(
            db_session,
            model,
            "sd3",
            kind="img2img",
            input_image=image,
            seeds=(3,),
            steps=4,
            options=JobOptions(strength=0.25).to_json(),
        )
        assert render_job(runtime, job.id) == "done"
        ((_, png),) = stored(db_session, runtime, job)
        results.append(pixels(png))
    assert not np.array_equal(results[0], results[1])


# --- what each family refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        ("sd3", {"prompt": "a (red:1.3) sneaker"}, "prompt: prompt weights such as (word:1.3)"),
        ("flux", {"negative_prompt": "[blurry]"}, "negative_prompt: prompt weights"),
        (
            "flux",
            {"negative_prompt": "blurry"},
            "negative_prompt: FLUX.1 reads a negative prompt only with true CFG",
        ),
        (
            "sd3",
            {"options": JobOptions(true_cfg=4.0).to_json()},
            "true_cfg: true CFG is for FLUX.1 models only",
        ),
        ("flux-schnell", {"guidance": 3.5}, "guidance: FLUX.1-schnell takes no guidance"),
        ("sd3", {"scheduler": "euler_a"}, "scheduler: SD3 renders with its own flow-matching"),
        ("flux", {"width": 72}, "width: FLUX.1 renders sizes that are multiples of 16, got 72"),
    ],
)
def test_a_family_refuses_what_it_cannot_render(
    runtime: WorkerRuntime,
    db_session: Session,
    family_dirs: dict[str, pathlib.Path],
    arch: str,
    overrides: dict[str, Any],
    message: str,
) -> None:
    job = family_job(db_session, family_dirs[arch], arch, **overrides)
    assert render_job(runtime, job.id) == "failed"
    status, error = outcome(db_session, job)
    assert status == JobStatus.FAILED
    assert error is not None and message in error, error
    assert stored(db_session, runtime, job) == []
