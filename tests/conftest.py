"""Shared fixtures: real Postgres, Redis, RabbitMQ and an S3 endpoint (moto's server mode).

Postgres: migrations run once into a template database. Transactional tests get a session
inside a transaction that is rolled back; tests that need other processes (workers) get a
fresh database cloned from the template.

A service that is down fails the test with a message saying which and how to start it:
tests never skip over a missing service.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade

pytest_plugins = ["tests.model_fixtures"]

POSTGRES_URL = os.environ.get(
    "PIXELMILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PIXELMILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("PIXELMILL_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def require_service(name: str, url: str, default_port: int) -> None:
    parsed = make_url(url) if "://" in url else None
    host = (parsed.host if parsed else None) or "127.0.0.1"
    port = (parsed.port if parsed else None) or default_port
    try:
        with closing(socket.create_connection((host, port), timeout=3)):
            return
    except OSError as exc:
        pytest.fail(
            f"{name} is not reachable at {host}:{port} ({exc}); start it (.ci/run shows how)",
            pytrace=False,
        )


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- Postgres ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    require_service("PostgreSQL", POSTGRES_URL, 5432)
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def _database_url(name: str) -> str:
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


def _drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def template_database(pg_admin: Engine) -> Iterator[str]:
    """A database migrated to head, used only as the template of the others."""
    name = f"pixelmill_test_template_{os.getpid()}"
    _drop_database(pg_admin, name)
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    upgrade(_database_url(name))
    yield name
    _drop_database(pg_admin, name)


@pytest.fixture(scope="session")
def clone_database(pg_admin: Engine, template_database: str) -> Iterator[Callable[[], str]]:
    """Make a fresh migrated database (a clone of the template); dropped at session end."""
    made: list[str] = []

    def clone() -> str:
        name = f"pixelmill_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with pg_admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
        made.append(name)
        return _database_url(name)

    yield clone
    for name in made:
        _drop_database(pg_admin, name)


@pytest.fixture(scope="session")
def pg_engine(clone_database: Callable[[], str]) -> Iterator[Engine]:
    """The database of the transactional tests."""
    engine = create_engine(clone_database())
    yield engine
    engine.dispose()


@pytest.fixture
def pg_connection(pg_engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back after the test."""
    with pg_engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@pytest.fixture
def pg_sessions(pg_connection: Connection) -> sessionmaker[Session]:
    """Sessions joined to the test's transaction: their commits become savepoints."""
    return sessionmaker(
        bind=pg_connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )


@pytest.fixture
def db_session(pg_sessions: sessionmaker[Session]) -> Iterator[Session]:
    with pg_sessions() as session:
        yield session


@pytest.fixture
def fresh_database_url(clone_database: Callable[[], str]) -> str:
    """A committed, migrated database of its own, for tests that span processes."""
    return clone_database()


# --- S3 (moto server) ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_settings(s3_endpoint: str) -> dict[str, str]:
    """Settings (as PIXELMILL_* values) for a new empty bucket on the moto server."""
    import boto3

    bucket = f"pixelmill-test-{uuid.uuid4().hex[:12]}"
    values = {
        "storage": "s3",
        "s3_bucket": bucket,
        "s3_endpoint_url": s3_endpoint,
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
    }
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    return values


# --- brokers ------------------------------------------------------------------------------


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        require_service("Redis", REDIS_URL, 6379)
        return REDIS_URL
    require_service("RabbitMQ", RABBITMQ_URL, 5672)
    return RABBITMQ_URL


@pytest.fixture
def render_queue(broker_url: str) -> Iterator[str]:
    """A queue of the test's own, deleted afterwards, so tests never see each other's jobs."""
    from kombu import Connection as BrokerConnection

    name = f"render-test-{uuid.uuid4().hex[:10]}"
    yield name
    # The queue may never have been declared if the test failed early.
    with BrokerConnection(broker_url) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(name)


# --- worker processes ---------------------------------------------------------------------


def settings_env(values: dict[str, str | Path]) -> dict[str, str]:
    """Turn settings values into the PIXELMILL_* environment of a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")}
    env.update({f"PIXELMILL_{key.upper()}": str(value) for key, value in values.items()})
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], queue: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.main",
                "worker",
                "--pool=prefork",
                "--concurrency=1",
                f"--queues={queue}",
                f"--hostname=test-{uuid.uuid4().hex[:6]}@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-8000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown: finish the current task
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str], str], WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], queue: str) -> WorkerProcess:
        worker = WorkerProcess(env, queue, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def no_open_jobs(engine: Engine) -> Callable[[], bool]:
    """A condition for :func:`wait_for`: no job of the database is open (pending, queued or
    running) any more."""
    from sqlalchemy import func, select

    from db.models import OPEN_JOB_STATUSES, Job

    def ended() -> bool:
        with Session(engine) as session:
            count = select(func.count()).select_from(Job).where(Job.status.in_(OPEN_JOB_STATUSES))
            return session.scalar(count) == 0

    return ended


def wait_for(
    condition: Callable[[], bool], *, timeout: float, what: str, worker: WorkerProcess | None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if worker is not None and worker.process.poll() is not None:
            pytest.fail(f"worker exited ({worker.process.returncode}):\n{worker.output()}")
        time.sleep(0.25)
    details = worker.output() if worker is not None else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{details}")
