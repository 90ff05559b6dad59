"""Review fixtures: a committed Postgres database of the test's own (the app, its threads and
other connections must see each other's commits), local storage in tmp_path, reviewers, and a
logged-in HTTP client."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.models import Reviewer
from db.session import make_engine, make_sessionmaker
from pixelmill.settings import Settings, get_settings
from pixelmill.storage import LocalStorage, Storage
from review.accounts import add_reviewer
from review.app import create_app
from tests.conftest import free_port

PASSWORD = "correct horse battery"
SECRET = "s" * 40


@pytest.fixture
def review_engine(fresh_database_url: str) -> Iterator[Engine]:
    engine = make_engine(fresh_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(review_engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(review_engine)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        yield session


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return LocalStorage(tmp_path / "images")


def review_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "database_url": database_url,
        "storage_dir": tmp_path / "images",
        "review_secret_key": SECRET,
    }
    values.update(overrides)
    return get_settings(**values)


@pytest.fixture
def settings(tmp_path: Path, fresh_database_url: str) -> Settings:
    return review_settings(tmp_path, fresh_database_url)


@pytest.fixture
def alice(session: Session) -> Reviewer:
    return add_reviewer(session, "alice", PASSWORD)


@pytest.fixture
def bob(session: Session) -> Reviewer:
    return add_reviewer(session, "bob", PASSWORD)


@pytest.fixture
def boss(session: Session) -> Reviewer:
    return add_reviewer(session, "boss", PASSWORD, admin=True)


@pytest.fixture
def client(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage
) -> Iterator[TestClient]:
    app = create_app(settings, sessions=sessions, storage=storage, background_sync=False)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def serve() -> Iterator[Callable[[FastAPI], str]]:
    """Serve apps with uvicorn on loopback ports (stopped after the test); returns the URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: FastAPI) -> str:
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def served(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    serve: Callable[[FastAPI], str],
) -> str:
    return serve(create_app(settings, sessions=sessions, storage=storage, background_sync=False))


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def log_in(client: TestClient, name: str, password: str = PASSWORD) -> str:
    """Log in through the form; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    response = client.post(
        "/login",
        data={"name": name, "password": password, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/").text)
