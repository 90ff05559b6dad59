"""The app over HTTP: login on every page, CSRF on every POST, the pages and the JSON API."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import ImageReview, Reviewer, ReviewItem
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from review.accounts import set_password
from review.app import create_app
from review.queue import sync_queue
from tests.review.conftest import PASSWORD, log_in
from tests.review.factory import make_run

# Reachable without logging in: the health check, the metrics, the login form, static assets
# (the app's own CSS and JavaScript; they hold no data).
PUBLIC = {"/healthz", "/metrics", "/login"}


def _routes(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, read from the routers it includes."""
    from review import api, audit, pages, public

    found: list[tuple[str, str]] = []
    for router in (public.router, pages.router, api.router, audit.router):
        for route in router.routes:
            assert isinstance(route, APIRoute)
            found.extend((method, route.path) for method in sorted(route.methods or ()))
    return found


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_page_and_endpoint_needs_a_login(client: TestClient) -> None:
    routes = _routes(client)
    assert len(routes) > 15  # the enumeration found the app's routes
    for method, path in routes:
        if path in PUBLIC:
            continue
        response = client.request(method, _concrete(path), follow_redirects=False)
        if path.startswith("/api/") or method != "GET":
            assert response.status_code == 401, (method, path, response.status_code)
        else:
            assert response.status_code == 303, (method, path, response.status_code)
            assert response.headers["location"].startswith("/login?next=")
    assert client.get("/healthz").text == "ok"
    assert "pixelmill_review_decisions_total" in client.get("/metrics").text


def test_every_post_is_refused_without_the_csrf_token(client: TestClient, alice: Reviewer) -> None:
    token = log_in(client, "alice")
    posts = [path for method, path in _routes(client) if method == "POST"]
    assert "/login" in posts and "/api/items/{review_item_id}/decisions" in posts
    for path in posts:
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            response = client.post(_concrete(path), headers=headers, follow_redirects=False)
            assert response.status_code == 403, (path, headers, response.text)
    # A form with the wrong token is refused too; the right one passes.
    assert client.post("/logout", data={"csrf_token": "nope"}).status_code == 403
    response = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303  # logged out


def test_login_with_a_wrong_password_fails(client: TestClient, alice: Reviewer) -> None:
    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    response = client.post(
        "/login", data={"name": "alice", "password": "wrong password!", "csrf_token": token}
    )
    assert response.status_code == 401
    assert "Wrong name or password" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303


def test_login_goes_back_to_the_page_asked_for_but_never_off_site(
    client: TestClient, alice: Reviewer
) -> None:
    token = re.search(  # type: ignore[union-attr]
        r'name="csrf_token" value="([^"]+)"', client.get("/login?next=//evil.example/").text
    ).group(1)
    for target, expected in (
        ("/items/7", "/items/7"),
        ("//evil.example/", "/"),
        ("https://x", "/"),
    ):
        response = client.post(
            "/login",
            data={"name": "alice", "password": PASSWORD, "csrf_token": token, "next": target},
            follow_redirects=False,
        )
        assert response.headers["location"] == expected
        token = re.search(  # type: ignore[union-attr]
            r'name="csrf_token" value="([^"]+)"', client.get("/").text
        ).group(1)


def test_a_password_change_ends_open_sessions(
    client: TestClient, alice: Reviewer, session: Session
) -> None:
    log_in(client, "alice")
    assert client.get("/").status_code == 200
    set_password(session, "alice", "another long password")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_review_an_item_through_the_api(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer, bob: Reviewer
) -> None:
    made = make_run(session, items=2, storage=storage, flagged_seeds=1)
    token = log_in(client, "alice")
    headers = {"X-CSRF-Token": token}
    run_id = made.run.id

    # The queue syncs on demand when a reviewer finds it empty.
    claim = client.post(f"/api/runs/{run_id}/claim", headers=headers).json()
    item_id = claim["review_item_id"]
    assert item_id is not None
    item = client.get(f"/api/items/{item_id}").json()
    assert item["claimed_by"] == "alice"
    assert item["flagged_hidden"] == 2 and len(item["images"]) == 2  # 2 templates x 2 seeds
    assert all(image["safety"] == "safe" for image in item["images"])
    with_flagged = client.get(f"/api/items/{item_id}?flagged=true").json()
    assert len(with_flagged["images"]) == 4

    keep, other = (image["id"] for image in item["images"])
    response = client.post(
        f"/api/items/{item_id}/decisions",
        json={"image_id": keep, "decision": "keep"},
        headers=headers,
    )
    assert response.json() == {
        "image_id": keep,
        "decision": "keep",
        "changed": [{"image_id": keep, "decision": "keep"}],
    }
    bad = client.post(
        f"/api/items/{item_id}/decisions",
        json={"image_id": keep, "decision": "maybe"},
        headers=headers,
    )
    assert bad.status_code == 422 and "decision" in bad.text

    # Bob cannot touch Alice's item.
    bob_client = TestClient(client.app)
    bob_headers = {"X-CSRF-Token": log_in(bob_client, "bob")}
    refused = bob_client.post(
        f"/api/items/{item_id}/decisions",
        json={"image_id": other, "decision": "reject"},
        headers=bob_headers,
    )
    assert refused.status_code == 409 and "another reviewer" in refused.json()["detail"]
    bob_item = bob_client.post(f"/api/runs/{run_id}/claim", headers=bob_headers).json()
    assert bob_item["review_item_id"] not in (None, item_id)

    submitted = client.post(f"/api/items/{item_id}/submit", headers=headers).json()
    assert submitted == {"review_item_id": item_id, "rejected": 1}
    decisions = dict(session.execute(select(ImageReview.image_id, ImageReview.decision)).all())
    assert decisions == {keep: "keep", other: "reject"}

    log = client.get(f"/api/runs/{run_id}/decisions").json()
    assert [(e["action"], e["reviewer"]) for e in log] == [
        ("keep", "alice"),
        ("reject", "alice"),
        ("submit", "alice"),
    ]
    assert client.get(f"/api/images/{keep}").json()["decision"] == "keep"
    runs = client.get("/api/runs").json()
    assert runs[0]["items_done"] == 1 and runs[0]["items_open"] == 1
    rows = client.get(f"/api/runs/{run_id}/items?status=done").json()
    assert [row["id"] for row in rows] == [item_id]
    # Stats are for admins.
    assert client.get(f"/api/runs/{run_id}/stats").status_code == 403
    assert "keep" in client.get("/metrics").text


def test_the_grid_page_and_local_images(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=1, storage=storage, thumbnails=True)
    sync_queue(session)
    token = log_in(client, "alice")
    response = client.post(
        f"/runs/{made.run.id}/next", data={"csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303
    page = client.get(response.headers["location"])
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    thumbs = re.findall(r'<img src="(/files/[^"]+)"', page.text)
    assert len(thumbs) == 4 and all(".thumb.png" in url for url in thumbs)
    image = client.get(thumbs[0])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    # Only logged-in reviewers, only inside the storage folder.
    assert TestClient(client.app).get(thumbs[0], follow_redirects=False).status_code == 303
    (storage.root.parent / "secret.txt").write_text("no")  # type: ignore[attr-defined]
    for path in (
        "/files/../secret.txt",
        "/files/%2e%2e/secret.txt",
        "/files/runs/../../secret.txt",
    ):
        assert client.get(path).status_code == 404, path
    # Nothing left: the empty page says so.
    submitted = client.post(
        f"/api/items/{session.scalar(select(ReviewItem.id))}/submit",
        headers={"X-CSRF-Token": token},
    )
    assert submitted.status_code == 200
    empty = client.post(f"/runs/{made.run.id}/next", data={"csrf_token": token})
    assert "Nothing to review" in empty.text


def test_openapi_schema_is_served_behind_login(client: TestClient, alice: Reviewer) -> None:
    assert client.get("/api/openapi.json").status_code == 401
    assert client.get("/docs").status_code in (303, 404)
    log_in(client, "alice")
    schema = client.get("/api/openapi.json").json()
    assert "/api/items/{review_item_id}/decisions" in schema["paths"]
    assert "/api/runs" in schema["paths"]
    assert "DecisionIn" in schema["components"]["schemas"]


@pytest.mark.parametrize("path", ["/runs/1/stats", "/runs/1/export?format=csv"])
def test_admin_pages_refuse_reviewers(client: TestClient, alice: Reviewer, path: str) -> None:
    log_in(client, "alice")
    response = client.get(path)
    assert response.status_code == 403 and "admin" in response.text


def _counter(decision: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("pixelmill_review_decisions_total", {"decision": decision})
    return value or 0.0


def test_decisions_are_counted_for_prometheus(
    client: TestClient, session: Session, storage: Storage, alice: Reviewer
) -> None:
    made = make_run(session, items=1, templates=("studio",), seeds=3, storage=storage)
    headers = {"X-CSRF-Token": log_in(client, "alice")}
    before = {d: _counter(d) for d in ("keep", "reject", "undo", "reroll")}
    item_id = client.post(f"/api/runs/{made.run.id}/claim", headers=headers).json()[
        "review_item_id"
    ]
    first, second, _third = (image.id for image in made.images)
    for image_id, decision in ((first, "keep"), (second, "keep")):
        client.post(
            f"/api/items/{item_id}/decisions",
            json={"image_id": image_id, "decision": decision},
            headers=headers,
        ).raise_for_status()
    client.post(f"/api/items/{item_id}/undo", headers=headers).raise_for_status()
    client.post(f"/api/items/{item_id}/reroll", headers=headers).raise_for_status()
    after = {d: _counter(d) for d in before}
    # 2 keeps, 1 undo, 1 re-roll, which rejected the 2 images still undecided.
    assert {d: after[d] - before[d] for d in before} == {
        "keep": 2,
        "reject": 2,
        "undo": 1,
        "reroll": 1,
    }
    exposition = client.get("/metrics").text
    assert f'pixelmill_review_decisions_total{{decision="reroll"}} {after["reroll"]}' in exposition


def test_the_session_cookie_is_http_only_and_same_site(client: TestClient) -> None:
    response = client.get("/login")
    cookie = response.headers["set-cookie"].lower()
    assert "pixelmill_review=" in cookie and "httponly" in cookie and "samesite=lax" in cookie


def test_the_background_sync_fills_the_queue(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage, session: Session
) -> None:
    fast = settings.model_copy(update={"review_sync_seconds": 0.2})
    app = create_app(fast, sessions=sessions, storage=storage, background_sync=True)
    with TestClient(app):
        made = make_run(session, items=2)
        deadline = time.monotonic() + 30
        while session.scalar(select(func.count()).select_from(ReviewItem)) != 2:
            assert time.monotonic() < deadline, "the background sync added no items"
            time.sleep(0.1)
            session.rollback()  # a new snapshot
    rows = session.execute(select(ReviewItem.run_id, ReviewItem.status)).all()
    assert rows == [(made.run.id, "open")] * 2
