"""Thumbnails made on an image's first view: the grid points an image without one at
/thumbnails/ID, which makes it from the stored PNG, records it, and redirects to it (local
storage behind login, and moto's S3 server with presigned URLs)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import PIL.Image
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Image, Reviewer
from pixelmill.storage import S3Storage, Storage, storage_from_settings
from review.app import create_app
from review.queue import sync_queue
from tests.review.conftest import log_in, review_settings
from tests.review.factory import make_run


def _grid_sources(client: TestClient, run_id: int, token: str) -> list[str]:
    page = client.post(f"/runs/{run_id}/next", data={"csrf_token": token})
    assert page.status_code == 200
    return [src.replace("&amp;", "&") for src in re.findall(r'<img src="([^"]+)"', page.text)]


def _jpeg_size(data: bytes) -> tuple[int, int]:
    with PIL.Image.open(io.BytesIO(data)) as thumbnail:
        assert thumbnail.format == "JPEG"
        return thumbnail.size


def _thumbnail_keys(session: Session, ids: list[int]) -> dict[int, str | None]:
    session.expire_all()
    rows = session.execute(select(Image.id, Image.thumbnail_key).where(Image.id.in_(ids)))
    return {image_id: key for image_id, key in rows}


def test_the_first_view_makes_records_and_redirects_to_the_thumbnail(
    tmp_path: Path,
    fresh_database_url: str,
    sessions: sessionmaker[Session],
    session: Session,
    storage: Storage,
    alice: Reviewer,
) -> None:
    settings = review_settings(tmp_path, fresh_database_url, thumbnail_size=32)
    made = make_run(session, items=1, templates=("studio",), seeds=2, storage=storage)
    ids = [image.id for image in made.images]
    sync_queue(session)
    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    with TestClient(app) as client:
        # Without a login, nothing is made.
        assert client.get(f"/thumbnails/{ids[0]}", follow_redirects=False).status_code == 303
        assert _thumbnail_keys(session, ids) == {image_id: None for image_id in ids}

        token = log_in(client, "alice")
        assert sorted(_grid_sources(client, made.run.id, token)) == [
            f"/thumbnails/{image_id}" for image_id in sorted(ids)
        ]
        for image_id in ids:
            first = client.get(f"/thumbnails/{image_id}", follow_redirects=False)
            assert first.status_code == 302
            assert "max-age" in first.headers["cache-control"]
            location = first.headers["location"]
            assert location.startswith("/files/thumbs/runs/") and location.endswith(".jpg")
            assert _jpeg_size(client.get(location).content) == (32, 32)  # 64 px PNGs
        keys = _thumbnail_keys(session, ids)
        assert all(key is not None and storage.exists(key) for key in keys.values())

        # From then on the grid points at the stored thumbnail itself (the item still held).
        assert sorted(_grid_sources(client, made.run.id, token)) == sorted(
            f"/files/{key}" for key in keys.values()
        )
        again = client.get(f"/thumbnails/{ids[0]}", follow_redirects=False)
        assert again.headers["location"] == f"/files/{keys[ids[0]]}"


def test_a_missing_image_or_object_is_not_found(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=1, templates=("studio",), seeds=2, storage=storage)
    broken, removed = made.images
    storage.put(broken.storage_key, b"\x89PNG cut short", content_type="image/png")
    Path(storage.root, removed.storage_key).unlink()  # type: ignore[attr-defined]
    log_in(client, "alice")
    for image_id in (broken.id, removed.id, 999_999):
        response = client.get(f"/thumbnails/{image_id}", follow_redirects=False)
        assert response.status_code == 404, (image_id, response.text)
    assert _thumbnail_keys(session, [broken.id, removed.id]) == {broken.id: None, removed.id: None}


def test_on_s3_the_thumbnail_is_made_there_and_reached_presigned(
    tmp_path: Path,
    fresh_database_url: str,
    s3_settings: dict[str, str],
    sessions: sessionmaker[Session],
    session: Session,
    alice: Reviewer,
) -> None:
    settings = review_settings(
        tmp_path, fresh_database_url, **s3_settings, s3_prefix="nightly", thumbnail_size=48
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    made = make_run(session, items=1, templates=("studio",), seeds=1, storage=storage)
    (image,) = made.images
    sync_queue(session)
    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    with TestClient(app) as client:
        token = log_in(client, "alice")
        assert _grid_sources(client, made.run.id, token) == [f"/thumbnails/{image.id}"]
        response = client.get(f"/thumbnails/{image.id}", follow_redirects=False)
        assert response.status_code == 302
        location = response.headers["location"]
        parts = urlsplit(location)
        assert location.startswith(s3_settings["s3_endpoint_url"])
        assert parts.path.endswith(".jpg") and "/nightly/thumbs/runs/" in parts.path
        fetched = httpx.get(location)  # the signature is the permission
        assert fetched.status_code == 200 and _jpeg_size(fetched.content) == (48, 48)
        # The next grid shows the presigned thumbnail directly.
        (key,) = _thumbnail_keys(session, [image.id]).values()
        assert key is not None and storage.exists(key)
        sources = _grid_sources(client, made.run.id, token)
        assert len(sources) == 1 and urlsplit(sources[0]).path == parts.path
