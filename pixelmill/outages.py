"""Outages: a service pixelmill depends on (the database, the broker, storage) unreachable.

What the client libraries raise when their service is away (SQLAlchemy's OperationalError,
kombu's, botocore's connection errors, a refused socket) is turned into the kernel's
:class:`~pixelmill.errors.InfrastructureError` by :func:`infrastructure_error`, where it is
caught: the work itself is sound, so it is retried, after a pause that grows while the
outage lasts (:class:`RetryBackoff`), and the job's own attempts are not spent on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from pixelmill.errors import InfrastructureError

if TYPE_CHECKING:
    from pixelmill.settings import Settings

DATABASE = "database"
BROKER = "broker"
STORAGE = "storage"


class ServiceUnavailableError(InfrastructureError):
    """``service`` (database, broker, storage, or "a service" when a bare socket error does
    not say which) could not be reached; ``__cause__`` is the library's own error."""

    def __init__(self, service: str, cause: BaseException) -> None:
        self.service = service
        first = str(cause).strip().splitlines()
        reason = first[0] if first else ""
        super().__init__(f"{service} unreachable: {type(cause).__name__}: {reason}".rstrip(": "))
        self.__cause__ = cause


def infrastructure_error(exc: BaseException) -> InfrastructureError | None:
    """The InfrastructureError ``exc`` amounts to (itself if it is one), or None when it is
    something else: a bug, bad input, a conflict. Follows ``__cause__`` (a library error
    wrapped by our own code)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, InfrastructureError):
            return current
        service = _service_of(current)
        if service is not None:
            return ServiceUnavailableError(service, current)
        current = current.__cause__
    return None


def service_of(exc: BaseException) -> str | None:
    """The service an InfrastructureError names (database, broker, storage); None if none."""
    outage = infrastructure_error(exc)
    if outage is None:
        return None
    return getattr(outage, "service", "a service")


def _service_of(exc: BaseException) -> str | None:
    from sqlalchemy import exc as sql

    if isinstance(exc, sql.OperationalError | sql.InterfaceError | sql.DisconnectionError):
        return DATABASE
    if isinstance(exc, sql.TimeoutError):  # no connection free in the pool in time
        return DATABASE
    if isinstance(exc, sql.DBAPIError) and exc.connection_invalidated:
        return DATABASE
    from kombu.exceptions import OperationalError as KombuOperationalError

    if isinstance(exc, KombuOperationalError):
        return BROKER
    if _is_broker_client_error(exc):
        return BROKER
    if _is_storage_error(exc):
        return STORAGE
    if isinstance(exc, ConnectionError | TimeoutError):
        return "a service"
    return None


def _is_broker_client_error(exc: BaseException) -> bool:
    from amqp.exceptions import ConnectionError as AmqpConnectionError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, AmqpConnectionError | RedisConnectionError | RedisTimeoutError)


def _is_storage_error(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        # 5xx and throttling: the store is there but not serving (a 4xx is our request).
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        return int(status) >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout"}
    return False


@dataclass(frozen=True)
class RetryBackoff:
    """Exponential backoff with jitter: the pause before try ``n + 1`` after ``n`` failed
    ones doubles from ``base`` up to ``cap`` seconds, and is drawn between half of that and
    all of it, so that jobs (or processes) that failed together do not return together."""

    base: float
    cap: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryBackoff:
        return cls(settings.retry_backoff_seconds, settings.retry_backoff_max_seconds)

    def ceiling(self, failures: int) -> float:
        """The longest pause after ``failures`` failed tries (at least one)."""
        exponent = min(max(failures, 1) - 1, 32)
        return min(self.cap, self.base * 2**exponent)

    def seconds(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = self.ceiling(failures)
        draw = (rng or _random).random()
        return ceiling / 2 + draw * ceiling / 2

    def delay(self, failures: int, rng: random.Random | None = None) -> timedelta:
        return timedelta(seconds=self.seconds(failures, rng))


_random = random.Random()


class OutageBackoff:
    """The pauses of a loop that retries a round while a service is away: longer after each
    failed round in a row, back to none after a good one."""

    def __init__(self, backoff: RetryBackoff) -> None:
        self.backoff = backoff
        self.failures = 0

    def failed(self) -> float:
        """One more failed round: the seconds to wait before the next."""
        self.failures += 1
        return self.backoff.seconds(self.failures)

    def succeeded(self) -> int:
        """A good round; returns how many failed rounds preceded it."""
        failures, self.failures = self.failures, 0
        return failures
