"""Logins that hold against guessing and end for real: failed logins limited per account and
per client address (in memory, and in Redis shared by two app processes), 429 with
Retry-After; logout and a new password end the login on the server, copied cookies included;
Secure cookies unless the app is bound to loopback."""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Reviewer, utcnow
from db.review_sessions import ReviewSession
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from review.accounts import add_reviewer, set_password
from review.app import SESSION_COOKIE, create_app, secure_cookies
from tests.conftest import REDIS_URL, require_service
from tests.review.conftest import PASSWORD, csrf_of, log_in, review_settings

WRONG = "not the password!"
# A response of the TestClient or of httpx: whichever httpx package the TestClient uses.
Response = Any
LIMITS = {
    "review_login_failures_per_account": 3,
    "review_login_failures_per_address": 5,
    "review_login_window_seconds": 60,
}


def _app(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage, **extra: Any
) -> FastAPI:
    tuned = settings.model_copy(update={**LIMITS, **extra})
    return create_app(tuned, sessions=sessions, storage=storage, background_sync=False)


def _client(app: FastAPI, address: str) -> TestClient:
    """A client seen by the app as coming from ``address`` (no traffic leaves the test)."""
    return TestClient(app, client=(address, 40000))


def _attempt(client: TestClient, name: str, password: str) -> Response:
    token = csrf_of(client.get("/login").text)
    return client.post(
        "/login",
        data={"name": name, "password": password, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )


def _retry_after(response: Response) -> int:
    assert response.status_code == 429, response.text
    seconds = int(response.headers["retry-after"])
    assert 1 <= seconds <= 60
    assert f"Try again in {seconds} seconds" in response.text
    return seconds


@pytest.fixture
def app(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> FastAPI:
    return _app(settings, sessions, storage)


def test_failed_logins_are_limited_per_account(
    app: FastAPI, alice: Reviewer, bob: Reviewer, session: Session
) -> None:
    client = _client(app, "127.0.0.2")
    for _ in range(3):
        assert _attempt(client, "alice", WRONG).status_code == 401
    # The fourth try is refused before the password is looked at, even the right one.
    _retry_after(_attempt(client, "alice", PASSWORD))
    _retry_after(_attempt(_client(app, "127.0.0.3"), "alice", PASSWORD))  # any address
    # Another account from the same address is not locked out.
    assert _attempt(client, "bob", PASSWORD).status_code == 303
    # Names with no account are limited alike: the answers do not tell accounts apart.
    for _ in range(3):
        assert _attempt(_client(app, "127.0.0.4"), "mallory", WRONG).status_code == 401
    _retry_after(_attempt(_client(app, "127.0.0.5"), "mallory", WRONG))
    assert session.scalar(select(func.count()).select_from(ReviewSession)) == 1  # bob's


def test_failed_logins_are_limited_per_client_address(
    app: FastAPI, alice: Reviewer, bob: Reviewer
) -> None:
    guesser = _client(app, "127.0.0.6")
    # One guess at each of five names (no account's own limit is reached)...
    for name in ("alice", "bob", "carol", "dave", "erin"):
        assert _attempt(guesser, name, WRONG).status_code == 401
    # ...and the address is out of attempts, for every name, right password or not.
    for name, password in (("alice", PASSWORD), ("frank", WRONG), ("bob", PASSWORD)):
        _retry_after(_attempt(guesser, name, password))
    assert _attempt(_client(app, "127.0.0.7"), "alice", PASSWORD).status_code == 303


def test_a_successful_login_gives_the_account_its_attempts_back(
    app: FastAPI, alice: Reviewer
) -> None:
    client = _client(app, "127.0.0.8")
    for _ in range(2):
        assert _attempt(client, "alice", WRONG).status_code == 401
    assert _attempt(client, "alice", PASSWORD).status_code == 303
    client = _client(app, "127.0.0.9")
    for _ in range(2):
        assert _attempt(client, "alice", WRONG).status_code == 401
    assert _attempt(client, "alice", PASSWORD).status_code == 303


def test_parallel_guesses_do_not_slip_past_the_account_limit(
    app: FastAPI, alice: Reviewer, serve: Any
) -> None:
    url = serve(app)
    statuses: list[int] = []
    lock = threading.Lock()

    def guess() -> None:
        with httpx.Client(base_url=url) as client:
            token = csrf_of(client.get("/login").text)
            response = client.post(
                "/login", data={"name": "alice", "password": WRONG, "csrf_token": token}
            )
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=guess) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(statuses) == [401] * 3 + [429] * 9


@pytest.fixture
def redis_keys() -> Iterator[str]:
    """A Redis URL for the limiter; the counts it made are removed afterwards."""
    require_service("Redis", REDIS_URL, 6379)
    yield REDIS_URL
    connection = redis.Redis.from_url(REDIS_URL)
    for key in connection.scan_iter("LIMITS:pixelmill-review-login*"):
        connection.delete(key)


def test_redis_shares_the_counts_between_app_processes(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    session: Session,
    redis_keys: str,
) -> None:
    name = f"r{uuid.uuid4().hex[:12]}"  # apart from any other test run on the same Redis
    add_reviewer(session, name, PASSWORD)
    first = _app(settings, sessions, storage, review_rate_limit_url=redis_keys)
    second = _app(settings, sessions, storage, review_rate_limit_url=redis_keys)
    assert _attempt(_client(first, "127.0.1.1"), name, WRONG).status_code == 401
    assert _attempt(_client(second, "127.0.1.2"), name, WRONG).status_code == 401
    assert _attempt(_client(first, "127.0.1.3"), name, WRONG).status_code == 401
    _retry_after(_attempt(_client(second, "127.0.1.4"), name, PASSWORD))
    _retry_after(_attempt(_client(first, "127.0.1.5"), name, PASSWORD))


def test_a_bad_limiter_url_is_a_clear_error(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage
) -> None:
    from review.throttle import ThrottleSettingError

    with pytest.raises(ThrottleSettingError, match="PIXELMILL_REVIEW_RATE_LIMIT_URL"):
        _app(settings, sessions, storage, review_rate_limit_url="nosuch://host")


def _cookie(client: TestClient) -> str:
    value = client.cookies.get(SESSION_COOKIE)
    assert value
    return value


def test_logout_ends_the_login_on_the_server(client: TestClient, alice: Reviewer) -> None:
    token = log_in(client, "alice")
    copy = TestClient(client.app, cookies={SESSION_COOKIE: _cookie(client)})
    assert copy.get("/", follow_redirects=False).status_code == 200  # the copy works...
    response = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303
    # ...and stops working with the logout, on pages and the API alike.
    assert copy.get("/", follow_redirects=False).status_code == 303
    assert copy.get("/api/runs").status_code == 401
    assert copy.post("/api/runs/1/claim", headers={"X-CSRF-Token": token}).status_code == 401


def test_a_new_password_ends_every_login_of_that_reviewer_only(
    client: TestClient, alice: Reviewer, bob: Reviewer, session: Session
) -> None:
    log_in(client, "alice")
    laptop = TestClient(client.app)
    log_in(laptop, "alice")
    bobs = TestClient(client.app)
    log_in(bobs, "bob")
    copy = TestClient(client.app, cookies={SESSION_COOKIE: _cookie(client)})
    set_password(session, "alice", "another long password")
    for ended in (client, laptop, copy):
        assert ended.get("/api/runs").status_code == 401
    assert bobs.get("/api/runs").status_code == 200
    assert _attempt(TestClient(client.app), "alice", "another long password").status_code == 303


def test_an_expired_or_unknown_login_is_refused(
    client: TestClient, alice: Reviewer, session: Session, settings: Settings
) -> None:
    log_in(client, "alice")
    assert client.get("/api/runs").status_code == 200
    session.execute(update(ReviewSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    assert client.get("/api/runs").status_code == 401
    log_in(TestClient(client.app), "alice")  # a new login sweeps the expired one away
    session.expire_all()
    assert session.scalar(select(func.count()).select_from(ReviewSession)) == 1
    # A cookie signed with the app's own key but naming no login gets nowhere either.
    forged = base64.b64encode(json.dumps({"login": "made-up-token"}).encode())
    signer = TimestampSigner(settings.review_secret_key.get_secret_value())  # type: ignore[union-attr]
    cookie = signer.sign(forged).decode()
    assert (
        TestClient(client.app, cookies={SESSION_COOKIE: cookie}).get("/api/runs").status_code == 401
    )


@pytest.mark.parametrize(
    ("host", "explicit", "secure"),
    [
        ("127.0.0.1", None, False),
        ("127.1.2.3", None, False),
        ("localhost", None, False),
        ("::1", None, False),
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("192.0.2.10", None, True),
        ("review.example", None, True),
        ("0.0.0.0", False, False),
        ("127.0.0.1", True, True),
    ],
)
def test_cookies_are_secure_unless_bound_to_loopback(
    tmp_path: Path,
    fresh_database_url: str,
    sessions: sessionmaker[Session],
    storage: Storage,
    host: str,
    explicit: bool | None,
    secure: bool,
) -> None:
    settings = review_settings(
        tmp_path, fresh_database_url, review_host=host, review_secure_cookies=explicit
    )
    assert secure_cookies(settings) is secure
    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    page = TestClient(app).get("/login")
    cookie = page.headers["set-cookie"].lower()
    assert ("; secure" in cookie) is secure
    # Over plain HTTP a Secure cookie would be dropped: the form says why a login won't stick.
    assert ("HTTPS only" in page.text) is secure
    over_https = TestClient(app, base_url="https://review.example").get("/login")
    assert "HTTPS only" not in over_https.text


def test_login_form_fields_of_any_shape_are_answered_not_crashed_on(
    client: TestClient, alice: Reviewer
) -> None:
    for name, password in (
        ("ali\x00ce", PASSWORD),
        ("alice\n", PASSWORD),
        ("a" * 10_000, PASSWORD),
        ("alice", "\x00" * 20),
        ("élève", "ünïcödé pässwörd"),
        ("", ""),
    ):
        response = _attempt(client, name, password)
        assert response.status_code in (401, 422), (name[:20], response.status_code)
    assert re.search(r"Wrong name or password", _attempt(client, "alice", WRONG).text)
