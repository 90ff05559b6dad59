"""The whole slice, for real: catalogue -> jobs in Postgres -> dispatcher -> broker (Redis and
RabbitMQ) -> a Celery worker process -> diffusers -> PNGs in S3 (moto server) -> image rows,
each with its scores by the worker's scorer (the built-in tiny one)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from db.models import Image, Job, JobStatus
from db.ranking import ImageScore
from pixelmill.settings import get_settings
from producer.dispatch import celery_publisher, dispatch
from producer.produce import produce
from tests.conftest import WorkerProcess, settings_env, wait_for
from worker.celery_app import create_app
from worker.png import read_parameters

pytestmark = pytest.mark.integration

CATALOGUE = """sku,title,colour
A-1,canvas sneaker,red
B-2,leather bag,brown
C-3,desk lamp,black
"""

TEMPLATES = """key: sku
defaults:
  steps: 2
  width: 64
  height: 72
templates:
  studio:
    prompt: "product photo of a {{ colour }} {{ title }}, white background"
    negative_prompt: "blurry"
"""


def test_catalogue_to_images_in_s3(
    tmp_path: Path,
    fresh_database_url: str,
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    tiny_model_dir: Path,
    start_worker: Callable[[dict[str, str], str], WorkerProcess],
) -> None:
    values: dict[str, str | Path] = {
        "database_url": fresh_database_url,
        "broker_url": broker_url,
        "render_queue": render_queue,
        "model": str(tiny_model_dir),
        "device": "cpu",
        "data_dir": tmp_path / "data",
        "scorer": "tiny",
        **s3_settings,
    }
    settings = get_settings(**values)
    (tmp_path / "catalogue.csv").write_text(CATALOGUE)
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    engine = create_engine(fresh_database_url)

    with Session(engine) as session:
        report = produce(
            session,
            catalogue_path=tmp_path / "catalogue.csv",
            templates_path=tmp_path / "templates.yaml",
            seeds=3,
            default_model=settings.model,
            run_name="nightly",
        )
    assert report.jobs_new == 3

    worker = start_worker(settings_env(values), render_queue)
    with Session(engine) as session:
        published = dispatch(
            session,
            celery_publisher(create_app(settings), render_queue),
            requeue_after=timedelta(minutes=10),
        )
    assert published.published == 3

    def all_done() -> bool:
        with Session(engine) as session:
            open_jobs = session.scalar(
                select(func.count()).where(Job.status != JobStatus.DONE).select_from(Job)
            )
            return open_jobs == 0

    wait_for(all_done, timeout=180, what="every job to be done", worker=worker)

    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_settings["s3_endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with Session(engine) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert {job.status for job in jobs} == {JobStatus.DONE}
        expected = {(job.id, seed) for job in jobs for seed in job.seeds}
        images = session.scalars(select(Image)).all()
        assert sorted((i.job_id, i.seed) for i in images) == sorted(expected)  # one per seed
        for image in images:
            body = s3.get_object(Bucket=s3_settings["s3_bucket"], Key=image.storage_key)["Body"]
            png = body.read()
            assert hashlib.sha256(png).hexdigest() == image.sha256
            assert len(png) == image.bytes
            decoded = PILImage.open(io.BytesIO(png))
            assert decoded.format == "PNG"
            assert decoded.size == (64, 72) == (image.width, image.height)
            parameters = read_parameters(png)
            assert parameters is not None and f"Seed: {image.seed}," in parameters
        # Scored by the worker as it rendered, in the transaction of the image rows.
        scores = session.scalars(select(ImageScore)).all()
        assert sorted(score.image_id for score in scores) == sorted(i.id for i in images)
        assert len({score.scorer for score in scores}) == 1
        assert all(-1 <= score.clip_score <= 1 for score in scores)
        assert all(score.aesthetic_score is not None for score in scores)
    engine.dispose()
