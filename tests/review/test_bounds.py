"""Bounded requests: bodies over the cap are refused with 413 as they arrive (declared or
streamed), ids beyond 64 bits, NUL bytes, negative or zero page sizes and forged headers are
answered 404/422/403, never 500, on every route; releasing an item you do not hold is 409."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade
from db.models import Reviewer
from db.session import make_engine, make_sessionmaker
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from review import api, audit, pages, public
from review.accounts import add_reviewer
from review.app import create_app
from review.queue import claim_next, sync_queue
from tests.review.conftest import PASSWORD, csrf_of, log_in, review_settings
from tests.review.factory import MadeRun, make_run

CAP = 4096
LEASE = timedelta(minutes=10)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def app(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> FastAPI:
    capped = settings.model_copy(update={"review_max_body_bytes": CAP})
    return create_app(capped, sessions=sessions, storage=storage, background_sync=False)


@pytest.fixture
def admin_client(app: FastAPI, boss: Reviewer) -> Iterator[tuple[TestClient, str]]:
    # Server errors come back as 500 responses, so the test sees them instead of a traceback.
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, log_in(client, "boss")


@pytest.fixture
def made(session: Session, storage: Storage) -> MadeRun:
    made = make_run(session, items=2, templates=("studio",), seeds=2, storage=storage)
    sync_queue(session)
    return made


def _routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves but logout (the corpus runs logged in)."""
    found: list[tuple[str, str]] = []
    for router in (public.router, pages.router, api.router, audit.router):
        for route in router.routes:
            assert isinstance(route, APIRoute)
            found.extend((method, route.path) for method in sorted(route.methods or ()))
    return [route for route in found if route != ("POST", "/logout")]


BAD_IDS = [
    str(2**63),  # one past the largest BIGINT
    str(2**64 + 1),
    "9" * 40,
    "-1",
    "0",
    "%00",
    "1%00",
    "1.5",
    "0x10",
    "%E2%80%8B1",  # a zero-width space before the digit
]


def test_no_route_answers_a_bad_id_with_a_server_error(
    admin_client: tuple[TestClient, str], made: MadeRun
) -> None:
    _try_bad_ids(*admin_client)


def test_no_route_answers_a_bad_id_with_a_server_error_on_sqlite(
    tmp_path: Path, storage: Storage
) -> None:
    """The embedded database, whose driver refuses integers past 64 bits outright."""
    url = f"sqlite:///{tmp_path / 'review.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        add_reviewer(session, "boss", PASSWORD, admin=True)
        make_run(session, items=1, templates=("studio",), seeds=1, storage=storage)
    settings = review_settings(tmp_path, url, review_max_body_bytes=CAP)
    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        _try_bad_ids(client, log_in(client, "boss"))
    engine.dispose()


def _try_bad_ids(client: TestClient, token: str) -> None:
    headers = {"X-CSRF-Token": token}
    routes = [(m, p) for m, p in _routes() if re.search(r"\{\w+\}", p)]
    assert len(routes) > 10
    for method, path in routes:
        for bad in BAD_IDS:
            concrete = re.sub(r"\{(\w+)(:path)?\}", bad, path)
            response = client.request(method, concrete, headers=headers, json={})
            assert response.status_code < 500, (method, concrete, response.text)
            if "%00" in bad or len(bad) > 18 or bad.startswith("-"):
                assert response.status_code in (404, 422), (method, concrete, response.text)


@pytest.mark.parametrize(
    "query",
    [
        "limit=-1",
        "limit=0",
        "limit=-99999999999999999999",
        "after=-1",
        f"after={2**64}",
        "status=%00",
        "status=bogus",
        "status=open%00",
        "flagged=%00",
        "format=xlsx",
        "besides=-3",
        f"besides={2**63}",
        "next=%00",
    ],
)
def test_bad_query_values_are_refused_on_every_route(
    admin_client: tuple[TestClient, str], made: MadeRun, query: str
) -> None:
    client, token = admin_client
    run_id, item_id = made.run.id, 1
    for method, path in _routes():
        concrete = path.replace("{run_id}", str(run_id)).replace("{review_item_id}", str(item_id))
        concrete = re.sub(r"\{\w+(:path)?\}", "1", concrete)
        response = client.request(
            method, f"{concrete}?{query}", headers={"X-CSRF-Token": token}, json={}
        )
        assert response.status_code < 500, (method, concrete, query, response.text)
    # The routes that take them refuse them outright.
    name = query.split("=")[0]
    takes = {
        "limit": ["/api/runs", f"/api/runs/{run_id}/items", f"/api/runs/{run_id}/decisions"],
        "after": [f"/api/runs/{run_id}/items", f"/api/runs/{run_id}/decisions"],
        "status": [f"/api/runs/{run_id}/items"],
    }
    for path in takes.get(name, []):
        response = client.get(f"{path}?{query}")
        assert response.status_code == 422, (path, query, response.text)


def test_nul_bytes_anywhere_in_a_path_are_not_found(
    admin_client: tuple[TestClient, str], made: MadeRun
) -> None:
    client, _token = admin_client
    for path in (
        "/files/%00",
        "/files/runs/%00/x.png",
        "/static/%00review.js",
        "/static/review.js%00.png",
        "/items/1%00",
        "/%00",
        "/api/runs/%00/items",
        "/login%00",
    ):
        response = client.get(path)
        assert response.status_code == 404, (path, response.status_code, response.text)
    assert client.get("/static/review.js").status_code == 200


def test_bad_json_bodies_are_refused(
    admin_client: tuple[TestClient, str], made: MadeRun, boss: Reviewer, session: Session
) -> None:
    client, token = admin_client
    item_id = claim_next(session, run_id=made.run.id, reviewer_id=boss.id, lease=LEASE)
    path = f"/api/items/{item_id}/decisions"
    bodies: list[object] = [
        {"image_id": 2**63, "decision": "keep"},
        {"image_id": 2**70, "decision": "keep"},
        {"image_id": -1, "decision": "keep"},
        {"image_id": 0, "decision": "keep"},
        {"image_id": "1\u0000", "decision": "keep"},
        {"image_id": made.images[0].id, "decision": "keep\u0000"},
        {"image_id": None, "decision": None},
        [],
    ]
    for body in bodies:
        response = client.post(path, json=body, headers={"X-CSRF-Token": token})
        assert response.status_code == 422, (body, response.text)
    for raw in (
        b"{",
        b"\xff\xfe",
        b'{"image_id": 1e999, "decision": "keep"}',
        b'{"image_id": 1, "decision": "\\ud800"}',  # a lone surrogate, escaped in the JSON
    ):
        response = client.post(
            path,
            content=raw,
            headers={"X-CSRF-Token": token, "Content-Type": "application/json"},
        )
        assert response.status_code in (400, 422), (raw, response.text)


def test_forged_csrf_and_cookie_values_are_refused_not_crashed_on(
    admin_client: tuple[TestClient, str], made: MadeRun
) -> None:
    client, _token = admin_client
    for forged in ("é" * 8, "\u2603", "x" * 5000, " "):
        headers = {b"X-CSRF-Token": forged.encode("utf-8")}
        response = client.post(f"/api/runs/{made.run.id}/claim", headers=headers)
        assert response.status_code == 403, (forged[:10], response.text)
    response = client.post("/logout", data={"csrf_token": "é\u0000"})
    assert response.status_code == 403
    for cookie in (b"pixelmill_review=\xc3\xa9.", b"pixelmill_review=" + b"A" * 3000, b"=;=;"):
        response = TestClient(client.app).get("/api/runs", headers={b"Cookie": cookie})
        assert response.status_code == 401, cookie[:40]


def test_releasing_an_item_you_do_not_hold_is_a_conflict(
    app: FastAPI, made: MadeRun, alice: Reviewer, bob: Reviewer, session: Session
) -> None:
    alices = TestClient(app)
    alice_headers = {"X-CSRF-Token": log_in(alices, "alice")}
    bobs = TestClient(app)
    bob_headers = {"X-CSRF-Token": log_in(bobs, "bob")}
    run_id = made.run.id
    held = alices.post(f"/api/runs/{run_id}/claim", headers=alice_headers).json()
    item_id = held["review_item_id"]
    free = bobs.post(f"/api/runs/{run_id}/claim", headers=bob_headers).json()["review_item_id"]
    # Someone else's item, an item nobody holds, a submitted one, one that does not exist.
    assert bobs.post(f"/api/items/{item_id}/release", headers=bob_headers).status_code == 409
    assert bobs.post(f"/api/items/{free}/release", headers=bob_headers).status_code == 200
    response = bobs.post(f"/api/items/{free}/release", headers=bob_headers)
    assert response.status_code == 409 and "do not hold" in response.json()["detail"]
    alices.post(f"/api/items/{item_id}/submit", headers=alice_headers).raise_for_status()
    assert alices.post(f"/api/items/{item_id}/release", headers=alice_headers).status_code == 409
    assert alices.post("/api/items/999999/release", headers=alice_headers).status_code == 404


def test_a_body_over_the_cap_is_refused(app: FastAPI, alice: Reviewer, made: MadeRun) -> None:
    client = TestClient(app, raise_server_exceptions=False)
    token = log_in(client, "alice")
    headers = {"X-CSRF-Token": token}
    big = "x" * (CAP + 1)
    claim = f"/api/runs/{made.run.id}/claim"
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", claim, {"json": {"padding": big}}),
        ("POST", "/api/items/1/decisions", {"json": {"image_id": 1, "decision": big}}),
        ("POST", "/login", {"data": {"name": big, "password": "p", "csrf_token": token}}),
        ("POST", "/logout", {"data": {"csrf_token": token, "x": big}}),
        ("GET", "/healthz", {"content": big.encode()}),
        # Streamed: no Content-Length, the size shows only as the chunks arrive.
        ("POST", "/api/items/1/decisions", {"content": iter([b"{" + b" " * 1000] * 10)}),
        ("POST", "/login", {"content": iter([b"a=" + b"b" * 1000] * 10), "headers": FORM}),
    ]
    for method, path, kwargs in cases:
        extra = kwargs.pop("headers", {})
        response = client.request(method, path, headers={**headers, **extra}, **kwargs)
        assert response.status_code == 413, (method, path, response.text[:200])
    # Refused before anything was done: the oversized logout did not log out.
    assert client.get("/api/runs").status_code == 200
    # Under the cap, the same requests go through.
    ok = client.post(claim, headers=headers, json={"padding": "x" * (CAP - 100)})
    assert ok.status_code == 200


def _recv_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3})", data)
    assert match, data[:200]
    return int(match.group(1))


@pytest.mark.parametrize("declared", [True, False])
def test_a_100_mb_body_is_refused_before_it_is_read(
    app: FastAPI, serve: Callable[[FastAPI], str], declared: bool
) -> None:
    """Over a real socket: the answer comes while the client is still sending, after a small
    part of the 100 MB has gone out (the rest is never read into the server's memory)."""
    parts = urlsplit(serve(app))
    total = 100 * 1024 * 1024
    chunk = b"a" * 65536
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        length = f"Content-Length: {total}" if declared else "Transfer-Encoding: chunked"
        sock.sendall(
            f"POST /login HTTP/1.1\r\nHost: {parts.netloc}\r\n{length}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode()
        )
        sock.setblocking(False)
        status = None
        deadline = time.monotonic() + 60
        while sent < total and time.monotonic() < deadline:
            try:
                data = chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                sent += sock.send(data)
            except BlockingIOError:
                time.sleep(0.01)  # the server is not reading: look for its answer
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                continue
        sock.setblocking(True)
        status = _recv_status(sock)
    assert status == 413
    assert sent < total // 5, f"{sent} bytes went out before the answer"


def test_the_login_form_survives_odd_next_targets(app: FastAPI, alice: Reviewer) -> None:
    client = TestClient(app, raise_server_exceptions=False)
    for target in ("/\r\nSet-Cookie: x=1", "/items/1\x00", "/\x7f", "/ok"):
        token = csrf_of(client.get("/login").text)
        response = client.post(
            "/login",
            data={"name": "alice", "password": "correct horse battery", "csrf_token": token,
                  "next": target},
            follow_redirects=False,
        )  # fmt: skip
        assert response.status_code == 303
        assert response.headers["location"] == ("/ok" if target == "/ok" else "/")
