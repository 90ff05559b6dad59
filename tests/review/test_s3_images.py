"""Images on S3 reach the browser as short-lived presigned URLs (moto's S3 server)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from db.models import Reviewer
from pixelmill.storage import S3Storage, storage_from_settings
from review.app import create_app
from review.queue import sync_queue
from tests.review.conftest import log_in, review_settings
from tests.review.factory import make_run


def test_grid_images_are_presigned_s3_urls(
    tmp_path: Path,
    fresh_database_url: str,
    s3_settings: dict[str, str],
    sessions: sessionmaker[Session],
    session: Session,
    alice: Reviewer,
) -> None:
    settings = review_settings(
        tmp_path, fresh_database_url, **s3_settings, s3_prefix="nightly", review_url_seconds=120
    )
    storage = storage_from_settings(settings)
    assert isinstance(storage, S3Storage)
    made = make_run(session, items=1, templates=("studio",), seeds=2, storage=storage,
                    thumbnails=True)  # fmt: skip
    sync_queue(session)
    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    with TestClient(app) as client:
        token = log_in(client, "alice")
        response = client.post(f"/runs/{made.run.id}/next", data={"csrf_token": token})
        assert response.status_code == 200
        endpoint = s3_settings["s3_endpoint_url"]
        assert endpoint.removeprefix("http://") in response.headers["content-security-policy"]
        urls = re.findall(r'<img src="([^"]+)"', response.text)
        assert len(urls) == 2
        for url in urls:
            url = url.replace("&amp;", "&")
            parts = urlsplit(url)
            assert url.startswith(endpoint) and "/nightly/" in parts.path
            assert parts.path.endswith(".thumb.png")
            query = parse_qs(parts.query)
            assert query.get("X-Amz-Expires") == ["120"] or query.get("Expires")
            fetched = httpx.get(url)  # no credentials: the signature is the permission
            assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
        # Unsigned, the same object is refused.
        unsigned = httpx.get(urls[0].split("?", 1)[0])
        assert unsigned.status_code == 403
        # The app never serves S3 images itself.
        assert client.get("/files/runs/1/x.png").status_code == 404
