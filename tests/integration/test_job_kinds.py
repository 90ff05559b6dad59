"""Every job kind for real: catalogue images from a path, S3 and HTTP are staged once, then
Postgres -> broker -> a Celery worker process -> diffusers (img2img, inpaint, ControlNet,
LoRA + embedding + weighted long prompt) -> PNGs in S3 (moto) -> image rows.

The slice is shared by the tests below (one worker process, one run), so the expensive part
runs once; each test asserts on it one thing a job kind promises.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageOps
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from db.models import Image, InputImage, InputSource, Job, JobStatus
from pixelmill.settings import Settings, get_settings
from producer.dispatch import celery_publisher, dispatch
from producer.produce import produce
from producer.report import ProduceReport
from tests.conftest import WorkerProcess, settings_env, wait_for
from tests.producer.image_server import ImageServer
from worker.celery_app import create_app
from worker.png import read_parameters
from worker.tiny_adapters import TINY_EMBEDDING_TOKEN

pytestmark = pytest.mark.integration

SIZES = {  # template -> (width, height): each kind renders the size it was asked for
    "plain": (64, 64),
    "restyle": (72, 64),
    "scene": (64, 64),
    "outline": (64, 80),
    "styled": (64, 64),
}
# A weighted prompt well past CLIP's 77-token window.
LONG_TAIL = ", ".join(f"detail{i}" for i in range(60))

TEMPLATES = """key: sku
defaults:
  steps: 2
  seeds: 2
  image: photo
templates:
  plain:
    prompt: "studio photo of a {{{{ title }}}}"
    width: 64
    height: 64
  restyle:
    kind: img2img
    strength: 0.6
    prompt: "watercolor {{{{ title }}}}"
    width: 72
    height: 64
  scene:
    kind: inpaint
    mask: alpha
    prompt: "{{{{ title }}}} on a marble table"
    width: 64
    height: 64
  outline:
    kind: controlnet
    controlnet:
      model: {controlnet}
      conditioning: canny
      scale: 0.8
    prompt: "{{{{ title }}}} in a loft"
    width: 64
    height: 80
  styled:
    prompt: "(best quality:1.3), {token} {{{{ title }}}}, [blurry], {long_tail}"
    loras:
      - {{path: {lora}, scale: 0.9}}
    embeddings:
      - {{path: {embedding}, token: "{token}"}}
    width: 64
    height: 64
"""


def product_png(colour: tuple[int, int, int], size: tuple[int, int] = (96, 96)) -> bytes:
    """A product on a transparent background: an opaque rectangle, the rest alpha 0."""
    image = PILImage.new("RGBA", size, (0, 0, 0, 0))
    width, height = size
    image.paste((*colour, 255), (width // 4, height // 5, 3 * width // 4, 4 * height // 5))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Slice:
    settings: Settings
    engine: Engine
    report: ProduceReport
    s3: Any
    bucket: str
    server: ImageServer
    sources: dict[str, bytes]  # item key -> the product photo's bytes
    produce_again: Callable[[], ProduceReport]


def s3_client(s3_settings: dict[str, str]) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3_settings["s3_endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def kinds_slice(
    tmp_path_factory: pytest.TempPathFactory,
    clone_database: Callable[[], str],
    s3_endpoint: str,
    tiny_model_dir: Path,
    tiny_controlnet_dir: Path,
    tiny_lora_path: Path,
    tiny_embedding_path: Path,
) -> Iterator[Slice]:
    import uuid

    from tests.conftest import REDIS_URL, require_service

    require_service("Redis", REDIS_URL, 6379)
    work = tmp_path_factory.mktemp("kinds")
    bucket = f"pixelmill-kinds-{uuid.uuid4().hex[:10]}"
    s3_values = {
        "storage": "s3",
        "s3_bucket": bucket,
        "s3_endpoint_url": s3_endpoint,
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
    }
    s3 = s3_client(s3_values)
    s3.create_bucket(Bucket=bucket)
    queue = f"render-kinds-{uuid.uuid4().hex[:10]}"
    values: dict[str, str | Path] = {
        "database_url": clone_database(),
        "broker_url": REDIS_URL,
        "render_queue": queue,
        "model": str(tiny_model_dir),
        "device": "cpu",
        "data_dir": work / "data",
        "input_fetch_timeout_seconds": "5",
        **s3_values,
    }
    settings = get_settings(**values)

    # Three sources, one per kind of address; a fourth item's URL answers 404.
    sources = {
        "LOCAL-1": product_png((200, 40, 40)),
        "S3-2": product_png((40, 160, 60), size=(80, 120)),
        "HTTP-3": product_png((30, 60, 190), size=(128, 96)),
    }
    (work / "photos").mkdir()
    (work / "photos" / "local.png").write_bytes(sources["LOCAL-1"])
    s3.put_object(Bucket=bucket, Key="catalogue/s3.png", Body=sources["S3-2"])
    server = ImageServer()
    server.files["/http.png"] = sources["HTTP-3"]
    (work / "catalogue.csv").write_text(
        "sku,title,photo\n"
        "LOCAL-1,canvas sneaker,photos/local.png\n"
        f"S3-2,leather bag,s3://{bucket}/catalogue/s3.png\n"
        f"HTTP-3,desk lamp,{server.url('/http.png')}\n"
        f"GONE-4,wool scarf,{server.url('/missing')}\n"
    )
    (work / "templates.yaml").write_text(
        TEMPLATES.format(
            controlnet=tiny_controlnet_dir,
            lora=tiny_lora_path,
            embedding=tiny_embedding_path,
            token=TINY_EMBEDDING_TOKEN,
            long_tail=LONG_TAIL,
        )
    )
    engine = create_engine(settings.resolved_database_url)

    def produce_again() -> ProduceReport:
        with Session(engine) as session:
            return produce(
                session,
                catalogue_path=work / "catalogue.csv",
                templates_path=work / "templates.yaml",
                default_model=settings.model,
                run_name="kinds",
                settings=settings,
            )

    report = produce_again()
    worker = WorkerProcess(settings_env(values), queue, work / "worker.log")
    try:
        with Session(engine) as session:
            dispatch(
                session,
                celery_publisher(create_app(settings), queue),
                requeue_after=timedelta(minutes=10),
            )

        def all_ended() -> bool:
            with Session(engine) as session:
                open_jobs = session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.status.in_([JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING]))
                )
                return open_jobs == 0

        wait_for(all_ended, timeout=300, what="every job to end", worker=worker)
        yield Slice(settings, engine, report, s3, bucket, server, sources, produce_again)
    finally:
        worker.stop()
        server.close()
        engine.dispose()


def stored_png(slice_: Slice, key: str) -> bytes:
    body: bytes = slice_.s3.get_object(Bucket=slice_.bucket, Key=key)["Body"].read()
    return body


def test_every_kind_renders_its_size_and_records_its_inputs(kinds_slice: Slice) -> None:
    report = kinds_slice.report
    # Three good items x five templates; the fourth item's 404 is its own error.
    assert report.jobs_new == 15
    with Session(kinds_slice.engine) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert {job.status for job in jobs} == {JobStatus.DONE}, [
            (job.template, job.status, job.error) for job in jobs
        ]
        staged = {row.sha256: row for row in session.scalars(select(InputImage))}
        assert set(staged) == {
            hashlib.sha256(data).hexdigest() for data in kinds_slice.sources.values()
        }
        for job in jobs:
            kind = {"restyle": "img2img", "scene": "inpaint", "outline": "controlnet"}.get(
                job.template, "txt2img"
            )
            assert job.kind == kind
            assert (job.input_image is not None) == (kind != "txt2img")
            images = session.scalars(select(Image).where(Image.job_id == job.id)).all()
            assert sorted(image.seed for image in images) == sorted(job.seeds)
            for image in images:
                png = stored_png(kinds_slice, image.storage_key)
                assert hashlib.sha256(png).hexdigest() == image.sha256
                decoded = PILImage.open(io.BytesIO(png))
                assert decoded.size == SIZES[job.template] == (image.width, image.height)
                chunk = json.loads(decoded.text["pixelmill"])
                assert chunk["kind"] == kind
                assert chunk.get("input_image") == job.input_image


def test_inpaint_keeps_the_products_pixels(kinds_slice: Slice) -> None:
    with Session(kinds_slice.engine) as session:
        rows = session.execute(
            select(Image.storage_key, Job.width, Job.height, Job.input_image)
            .join(Job, Job.id == Image.job_id)
            .where(Job.template == "scene")
        ).all()
    assert len(rows) == 6
    by_hash = {hashlib.sha256(d).hexdigest(): d for d in kinds_slice.sources.values()}
    for key, width, height, input_sha in rows:
        product = PILImage.open(io.BytesIO(by_hash[input_sha])).convert("RGBA")
        fitted = np.asarray(ImageOps.fit(product, (width, height), PILImage.Resampling.LANCZOS))
        rendered = np.asarray(
            PILImage.open(io.BytesIO(stored_png(kinds_slice, key))).convert("RGB")
        )
        kept = fitted[..., 3] == 255
        generated = fitted[..., 3] == 0
        assert kept.sum() > 100 and generated.sum() > 100
        assert (rendered[kept] == fitted[..., :3][kept]).all()
        # ... and the rest was generated, not copied (the transparent area is black there).
        assert (rendered[generated] != fitted[..., :3][generated]).any()


def test_adapters_and_weighted_prompt_are_recorded_as_written(kinds_slice: Slice) -> None:
    with Session(kinds_slice.engine) as session:
        job = session.scalars(select(Job).where(Job.template == "styled").limit(1)).one()
        options = job.options
        key = session.scalars(
            select(Image.storage_key).where(Image.job_id == job.id).limit(1)
        ).one()
    assert options is not None
    assert [lora["scale"] for lora in options["loras"]] == [0.9]
    assert [e["token"] for e in options["embeddings"]] == [TINY_EMBEDDING_TOKEN]
    png = stored_png(kinds_slice, key)
    parameters = read_parameters(png)
    assert parameters is not None
    # The A1111 text keeps the user's weights and the whole long prompt.
    assert parameters.startswith(f"(best quality:1.3), {TINY_EMBEDDING_TOKEN} ")
    assert "detail59" in parameters
    assert "Lora hashes:" in parameters and "TI hashes:" in parameters


def test_bad_image_is_its_items_error_and_sources_are_fetched_once(kinds_slice: Slice) -> None:
    report = kinds_slice.report
    messages = [str(problem) for problem in report.problems]
    assert any(
        "catalogue.csv:5: field 'photo'" in m and "GONE-4" in m and "HTTP 404" in m
        for m in messages
    ), messages
    assert report.inputs_fetched == 3 and report.inputs_failed == 1
    assert kinds_slice.server.requests["/http.png"] == 1

    again = kinds_slice.produce_again()
    assert again.jobs_new == 0 and again.jobs_unchanged == 15
    assert again.inputs_reused == 3
    assert kinds_slice.server.requests["/http.png"] == 1  # staged: not fetched again
    with Session(kinds_slice.engine) as session:
        assert session.scalar(select(func.count()).select_from(InputSource)) == 3
