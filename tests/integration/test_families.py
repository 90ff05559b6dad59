"""SD3 and FLUX.1 through the whole slice: a catalogue whose templates name a tiny SD3 and a
tiny FLUX.1-schnell model (with true CFG, so with a negative prompt) -> jobs in Postgres ->
dispatcher -> broker (Redis and RabbitMQ) -> a Celery worker process -> the families'
diffusers pipelines and the separate safety step -> PNGs in S3 (moto server) -> image rows."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.models import Image, Job, JobStatus
from pixelmill.settings import get_settings
from producer.dispatch import celery_publisher, dispatch
from producer.produce import produce
from tests.conftest import WorkerProcess, no_open_jobs, settings_env, wait_for
from worker.celery_app import create_app
from worker.png import read_parameters, read_pixelmill
from worker.tiny_families import build_tiny_family

pytestmark = pytest.mark.integration

CATALOGUE = """sku,title,colour
A-1,canvas sneaker,red
B-2,leather bag,brown
"""

TEMPLATES = """key: sku
defaults:
  steps: 2
  width: 64
  height: 80
templates:
  sd3_studio:
    model: {sd3}
    prompt: "product photo of a {{{{ colour }}}} {{{{ title }}}}, white background"
    negative_prompt: "blurry"
    guidance: 4.5
  flux_studio:
    model: {flux}
    prompt: "a {{{{ colour }}}} {{{{ title }}}} on a wooden table"
    negative_prompt: "text, watermark"
    true_cfg: 3
    guidance: 0
"""
# What each template's PNGs record of its guidance: FLUX.1 runs an unconditional pass only
# with true CFG (its guidance is no second pass); SD3 at guidance above 1.
GUIDANCE: dict[str, tuple[str, dict[str, Any]]] = {
    "sd3_studio": ("blurry", {"classifier_free_guidance": True}),
    "flux_studio": ("text, watermark", {"classifier_free_guidance": True, "true_cfg": 3.0}),
}


def test_sd3_and_flux_render_through_the_broker_into_s3(
    tmp_path: Path,
    fresh_database_url: str,
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    start_worker: Callable[[dict[str, str], str], WorkerProcess],
) -> None:
    models = {
        "sd3": build_tiny_family(tmp_path / "models" / "sd3", arch="sd3"),
        "flux": build_tiny_family(tmp_path / "models" / "flux-schnell", arch="flux-schnell"),
    }
    values: dict[str, str | Path] = {
        "database_url": fresh_database_url,
        "broker_url": broker_url,
        "render_queue": render_queue,
        "model": str(models["sd3"]),
        "device": "cpu",
        "data_dir": tmp_path / "data",
        **s3_settings,
    }
    settings = get_settings(**values)
    write_inputs(tmp_path, models)
    engine = create_engine(fresh_database_url)
    with Session(engine) as session:
        report = produce(
            session,
            catalogue_path=tmp_path / "catalogue.csv",
            templates_path=tmp_path / "templates.yaml",
            seeds=2,
            default_model=settings.model,
            run_name="nightly",
        )
    assert report.jobs_new == 4

    worker = start_worker(settings_env(values), render_queue)
    with Session(engine) as session:
        published = dispatch(
            session,
            celery_publisher(create_app(settings), render_queue),
            requeue_after=timedelta(minutes=10),
        )
    assert published.published == 4

    wait_for(no_open_jobs(engine), timeout=240, what="every job to finish", worker=worker)

    with Session(engine) as session:
        check_stored(session, s3_settings)
    engine.dispose()


def write_inputs(tmp_path: Path, models: dict[str, Path]) -> None:
    (tmp_path / "catalogue.csv").write_text(CATALOGUE)
    names = {family: json.dumps(str(folder)) for family, folder in models.items()}
    (tmp_path / "templates.yaml").write_text(TEMPLATES.format(**names))


def check_stored(session: Session, s3_settings: dict[str, str]) -> None:
    """Every job done, one image per seed in S3 with its family in the PNG's metadata."""
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_settings["s3_endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    jobs = session.scalars(select(Job).order_by(Job.id)).all()
    assert [(job.status, job.error) for job in jobs] == [(JobStatus.DONE, None)] * 4
    families: dict[str, set[str]] = {}
    for job in jobs:
        images = session.scalars(select(Image).where(Image.job_id == job.id)).all()
        assert sorted(image.seed for image in images) == sorted(job.seeds)
        for image in images:
            key = image.storage_key
            png = s3.get_object(Bucket=s3_settings["s3_bucket"], Key=key)["Body"].read()
            assert hashlib.sha256(png).hexdigest() == image.sha256
            assert PILImage.open(io.BytesIO(png)).size == (64, 80)
            assert image.safety == "safe"  # checked by the separate step
            chunk = read_pixelmill(png)
            assert chunk is not None and chunk["model"] == job.model
            families.setdefault(job.template, set()).add(
                f"{chunk['family']['name']}/{chunk['family']['variant']}"
            )
            negative, guidance = GUIDANCE[job.template]
            assert {key: chunk.get(key) for key in guidance} == guidance
            parameters = read_parameters(png)
            assert parameters is not None and f"Seed: {image.seed}," in parameters
            assert f"Negative prompt: {negative}\n" in parameters
    assert families == {"sd3_studio": {"sd3/3-medium"}, "flux_studio": {"flux/schnell"}}
    # The true CFG scale is a job option, so in the dedupe key.
    assert {job.template: job.options for job in jobs} == {
        "sd3_studio": None,
        "flux_studio": {"true_cfg": 3.0},
    }
    # One dedupe key per job: the model (and so the family) is part of it.
    assert len({job.dedupe_key for job in jobs}) == 4
