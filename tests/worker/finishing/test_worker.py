"""End to end on real services: a reviewer submits an item in the review app, which queues
its finishing on Redis after the commit; a real Celery worker serving the render and
finishing queues upscales and captions the keeper into moto S3 and Postgres; the channel
export then writes the keeper's marked files to S3 from the upscaled copy, read back."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kombu import Connection as BrokerConnection
from PIL import Image as PILImage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.finishing import CatalogueFill, ImageCaption, UpscaledImage
from db.models import Image, Run
from db.session import make_engine, make_sessionmaker
from pixelmill.settings import Settings, get_settings
from pixelmill.storage import S3Storage, make_s3_client, storage_from_settings
from pixelmill.tasks import FINISH_TASK
from review.accounts import add_reviewer
from review.app import create_app
from review.channels.export import export_channels
from review.channels.marking import (
    TRAINED_ALGORITHMIC_MEDIA,
    digital_source_type,
    read_c2pa,
    signer_from_settings,
)
from review.channels.presets import load_presets
from review.channels.sinks import open_sink
from tests.conftest import REDIS_URL, WorkerProcess, require_service, settings_env, wait_for
from tests.review.c2pa_chain import actions_of, make_chain
from tests.review.conftest import PASSWORD, SECRET, log_in
from tests.review.factory import make_run
from tests.worker.finishing.conftest import Models, noise_png
from worker.launch import served_queues

pytestmark = pytest.mark.integration


@pytest.fixture
def queues() -> Iterator[tuple[str, str]]:
    names = (f"render-test-{uuid.uuid4().hex[:8]}", f"finishing-test-{uuid.uuid4().hex[:8]}")
    yield names
    with BrokerConnection(REDIS_URL) as conn, contextlib.suppress(Exception):
        for name in names:
            conn.default_channel.queue_delete(name)


@pytest.fixture
def engine(fresh_database_url: str) -> Iterator[Engine]:
    engine = make_engine(fresh_database_url)
    yield engine
    engine.dispose()


def test_a_submitted_item_is_finished_by_a_worker(
    start_worker: Callable[[dict[str, str], str], WorkerProcess],
    queues: tuple[str, str],
    engine: Engine,
    fresh_database_url: str,
    s3_settings: dict[str, str],
    models: Models,
    tmp_path: Path,
) -> None:
    require_service("Redis", REDIS_URL, 6379)
    render_queue, finishing_queue = queues
    values: dict[str, str | Path] = {
        "data_dir": tmp_path / "var",
        "database_url": fresh_database_url,
        "broker_url": REDIS_URL,
        "render_queue": render_queue,
        "finishing_queue": finishing_queue,
        "upscale_model": str(models.real_esrgan_x4),
        "upscale_tile": "16",
        "caption_model": str(models.blip),
        "caption_max_tokens": "6",
        "caption_fill_field": "description",
        "review_reopen_seconds": "0",
        "review_secret_key": SECRET,
        **s3_settings,
    }
    worker = start_worker(settings_env(values), served_queues(render_queue, finishing_queue))
    settings = get_settings(**values)
    storage = storage_from_settings(settings)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        made = make_run(session, items=1, templates=("studio",), seeds=2, storage=storage)
        for number, image in enumerate(made.images):
            storage.put(image.storage_key, noise_png(24, 16, number), content_type="image/png")
        add_reviewer(session, "alice", PASSWORD)
        run_id, item_id = made.run.id, made.items[0].id

    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    with TestClient(app) as client:
        headers = {"X-CSRF-Token": log_in(client, "alice")}
        review_item_id = client.post(f"/api/runs/{run_id}/claim", headers=headers).json()[
            "review_item_id"
        ]
        keep, reject = (
            i["id"] for i in client.get(f"/api/items/{review_item_id}").json()["images"]
        )
        for image_id, decision in ((keep, "keep"), (reject, "reject")):
            client.post(
                f"/api/items/{review_item_id}/decisions",
                json={"image_id": image_id, "decision": decision},
                headers=headers,
            ).raise_for_status()
        client.post(f"/api/items/{review_item_id}/submit", headers=headers).raise_for_status()

    def finished() -> bool:
        with sessions() as session:
            return session.get(ImageCaption, keep) is not None and bool(
                session.scalars(select(UpscaledImage).where(UpscaledImage.image_id == keep)).all()
            )

    wait_for(finished, timeout=180, what="the keeper's finishing", worker=worker)
    with sessions() as session:
        (upscaled,) = session.scalars(select(UpscaledImage)).all()
        assert upscaled.image_id == keep and (upscaled.width, upscaled.height) == (96, 64)
        assert storage.exists(upscaled.storage_key)
        assert session.get(ImageCaption, reject) is None  # rejected: not finished
        fill = session.get(CatalogueFill, (item_id, "description"))
        assert fill is not None and fill.image_id == keep
        image = session.get(Image, keep)
        assert image is not None and upscaled.storage_key.startswith("approved/")
    assert FINISH_TASK in worker.output()
    with sessions() as session:
        check_s3_export(session, settings, run_id, keep, tmp_path)


def check_s3_export(
    session: Session, settings: Settings, run_id: int, keep: int, tmp_path: Path
) -> None:
    """The finished keeper exported for a built-in channel to S3, signed with a test chain:
    made from the upscaled copy, its caption as alt text, marked in XMP and C2PA."""
    chain = make_chain(tmp_path / "chain")
    settings = settings.model_copy(
        update={"c2pa_cert_path": chain.cert_path, "c2pa_key_path": chain.key_path}
    )
    storage = storage_from_settings(settings)
    run = session.get(Run, run_id)
    assert run is not None
    preset = load_presets()["web-shop"]
    sink = open_sink(f"s3://{settings.s3_bucket}/exports/night", settings)
    signer = signer_from_settings(settings)
    assert signer is not None
    with signer:
        export_channels(session, run, storage, [preset], sink, signer)
    read = S3Storage(make_s3_client(settings), settings.s3_bucket, "exports/night").get
    (record,) = [json.loads(line) for line in read("manifest.jsonl").decode().splitlines()]
    data = read(record["file"])
    (upscaled,) = session.scalars(select(UpscaledImage)).all()
    caption = session.get(ImageCaption, keep)
    assert caption is not None
    assert record["source_image"] == storage.url(upscaled.storage_key)
    assert record["alt_text"] == caption.alt_text and caption.alt_text
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    with PILImage.open(io.BytesIO(data)) as exported:
        assert exported.format == "WEBP" and max(exported.size) <= preset.longer_side
        assert exported.size == (record["width"], record["height"])
    assert digital_source_type(data) == TRAINED_ALGORITHMIC_MEDIA
    manifest = read_c2pa(data, "image/webp")
    assert manifest is not None
    assert actions_of(manifest)[0]["action"] == "c2pa.created"
