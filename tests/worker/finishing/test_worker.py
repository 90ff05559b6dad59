"""End to end on real services: a reviewer submits an item in the review app, which queues
its finishing on Redis after the commit; a real Celery worker serving the render and
finishing queues upscales and captions the keeper into moto S3 and Postgres."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kombu import Connection as BrokerConnection
from sqlalchemy import Engine, select

from db.finishing import CatalogueFill, ImageCaption, UpscaledImage
from db.models import Image
from db.session import make_engine, make_sessionmaker
from pixelmill.settings import get_settings
from pixelmill.storage import storage_from_settings
from pixelmill.tasks import FINISH_TASK
from review.accounts import add_reviewer
from review.app import create_app
from tests.conftest import REDIS_URL, WorkerProcess, require_service, settings_env, wait_for
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
