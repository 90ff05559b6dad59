"""Review decisions made the way a reviewer makes them: over HTTP, through the review app."""

from __future__ import annotations

import re
import time

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from review.accounts import add_reviewer

PASSWORD = "correct horse battery staple"


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def keep_and_reject(base_url: str, engine: Engine, run_id: int, *, timeout: float = 60) -> None:
    """Log in as a new reviewer, claim an item of run ``run_id`` (waiting for the review queue
    to take the run's finished items in), keep its first image and reject its second."""
    with Session(engine) as session:
        add_reviewer(session, "metrics-reviewer", PASSWORD)
    with httpx.Client(base_url=base_url, timeout=10) as client:
        token = _csrf(client.get("/login").text)
        response = client.post(
            "/login",
            data={"name": "metrics-reviewer", "password": PASSWORD, "csrf_token": token},
        )
        assert response.status_code in (200, 303), response.text
        headers = {"x-csrf-token": _csrf(client.get("/").text)}
        deadline = time.monotonic() + timeout
        item_id = None
        while item_id is None:
            assert time.monotonic() < deadline, "the review queue never offered an item"
            claimed = client.post(f"/api/runs/{run_id}/claim", headers=headers)
            assert claimed.status_code == 200, claimed.text
            item_id = claimed.json()["review_item_id"]
            if item_id is None:
                time.sleep(0.5)
        images = client.get(f"/api/items/{item_id}", headers=headers).json()["images"]
        assert len(images) >= 2, images
        for image, decision in zip(images[:2], ("keep", "reject"), strict=True):
            decided = client.post(
                f"/api/items/{item_id}/decisions",
                json={"image_id": image["id"], "decision": decision},
                headers=headers,
            )
            assert decided.status_code == 200, decided.text
