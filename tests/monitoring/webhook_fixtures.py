"""What the webhook tests share: committed databases on Postgres and SQLite, a clock the test
moves, and a delivery configuration."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from db.webhooks import WebhookDelivery
from monitoring.webhooks.delivery import WebhookConfig, utc_now
from monitoring.webhooks.outbox import Backoff

SECRET = b"webhook-secret-of-the-tests"


@pytest.fixture(params=["postgres", "sqlite"])
def any_sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a committed database of the test's own: deliverers in threads and the
    test see each other's commits."""
    if request.param == "postgres":
        url = request.getfixturevalue("fresh_database_url")
    else:
        url = f"sqlite:///{tmp_path / 'pixelmill.db'}"
        upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


class Clock:
    """The deliverer's clock: the test moves it instead of sleeping through backoffs."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def webhook_config(
    *urls: str, max_attempts: int = 10, reopen_seconds: float = 60.0
) -> WebhookConfig:
    """Backoff 10 s, doubling up to 80 s."""
    return WebhookConfig(
        urls=urls,
        secret=SECRET,
        timeout_seconds=5.0,
        backoff=Backoff(base_seconds=10.0, cap_seconds=80.0, max_attempts=max_attempts),
        poll_seconds=1.0,
        lookback=timedelta(days=30),
        reopen_window=timedelta(seconds=reopen_seconds),
    )


def deliveries(sessions: sessionmaker[Session]) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def aware(moment: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes (UTC): made aware to compare with the clock's."""
    if moment is None or moment.tzinfo is not None:
        return moment
    from datetime import UTC

    return moment.replace(tzinfo=UTC)
