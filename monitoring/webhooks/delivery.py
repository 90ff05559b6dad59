"""Delivering webhook events: one pass finds new transitions (events.py), gives new events a
delivery row per URL and posts every due delivery once (outbox.py); the loop behind
``pixelmill webhooks deliver`` runs a pass every poll interval.

A delivery is a POST of the event as JSON (the same bytes on every attempt), signed
(signing.py), with a timeout; a 2xx answer delivers it, anything else (another status, a
refused connection, a timeout, a redirect) is retried after backoff.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from sqlalchemy.orm import Session, sessionmaker

from monitoring.webhooks.events import detect_transitions
from monitoring.webhooks.outbox import (
    Backoff,
    Claim,
    claim_next,
    fan_out,
    mark_delivered,
    mark_failed,
)
from monitoring.webhooks.signing import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    signature_header,
)
from pixelmill.outages import infrastructure_error
from pixelmill.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
USER_AGENT = "pixelmill-webhooks/1"
# Deliveries attempted in one pass at most, so a pass ends and new events are looked for.
PASS_LIMIT = 500


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class WebhookConfig:
    urls: tuple[str, ...]
    secret: bytes
    timeout_seconds: float
    backoff: Backoff
    poll_seconds: float
    # Runs older than this are not looked at for transitions; the review reopen window.
    lookback: timedelta
    reopen_window: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookConfig:
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        return cls(
            urls=tuple(settings.webhook_urls),
            secret=secret.encode("utf-8"),
            timeout_seconds=settings.webhook_timeout_seconds,
            backoff=Backoff(
                base_seconds=settings.webhook_backoff_seconds,
                cap_seconds=settings.webhook_max_backoff_seconds,
                max_attempts=settings.webhook_max_attempts,
            ),
            poll_seconds=settings.webhook_poll_seconds,
            lookback=timedelta(days=settings.webhook_lookback_days),
            reopen_window=timedelta(seconds=settings.review_reopen_seconds),
        )

    @property
    def lease(self) -> timedelta:
        """How long a claimed delivery is held: past the request's timeout, with room."""
        return timedelta(seconds=self.timeout_seconds * 2 + 30)


def display_url(url: str) -> str:
    """``url`` without its user name and password, for logs and listings."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


def _iso(moment: datetime) -> str:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event_body(claim: Claim) -> bytes:
    """The request body: the event as compact JSON with sorted keys, the same bytes on every
    attempt and to every URL."""
    event = {
        "id": claim.event_id,
        "type": claim.event_type,
        "created_at": _iso(claim.created_at),
        "run": {"id": claim.run_id, "name": claim.run_name},
        "data": claim.data,
    }
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer other than 2xx: the POST is not followed as a GET elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclass(frozen=True)
class Outcome:
    status: int | None  # the HTTP status, None if no answer came
    error: str | None  # None: delivered


def _basic_auth(url: str) -> tuple[str, dict[str, str]]:
    """A URL with a user name (``https://user:password@host/...``) is sent to the URL without
    it, with the user name and password as HTTP Basic authentication."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, {}
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    token = base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    return display_url(url), {"Authorization": f"Basic {token}"}


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float) -> Outcome:
    """POST ``body`` and say whether the receiver accepted it (a 2xx status)."""
    target, auth = _basic_auth(url)
    request = urllib.request.Request(target, data=body, headers=headers | auth, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return Outcome(exc.code, f"HTTP {exc.code} {exc.reason}")
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out, bad answer
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return Outcome(None, f"{type(exc).__name__}: {reason}")
    if not 200 <= status < 300:
        return Outcome(status, f"HTTP {status}")
    return Outcome(status, None)


def request_headers(claim: Claim, body: bytes, secret: bytes, at: datetime) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_ID_HEADER: claim.event_id,
        EVENT_TYPE_HEADER: claim.event_type,
        SIGNATURE_HEADER: signature_header(secret, body, int(at.timestamp())),
    }


@dataclass
class PassReport:
    recorded: int = 0  # events recorded by detection in this pass
    fanned_out: int = 0  # events given their delivery rows
    delivered: int = 0
    failed: int = 0  # attempts that failed (retried later, or given up)
    given_up: int = 0
    errors: list[str] = field(default_factory=list)


def _attempt(session: Session, claim: Claim, config: WebhookConfig, clock: Clock) -> Outcome:
    body = event_body(claim)
    headers = request_headers(claim, body, config.secret, clock())
    outcome = post(claim.url, body, headers, timeout=config.timeout_seconds)
    if outcome.error is None:
        assert outcome.status is not None
        mark_delivered(session, claim, status=outcome.status, now=clock())
    else:
        mark_failed(
            session,
            claim,
            status=outcome.status,
            error=outcome.error,
            now=clock(),
            backoff=config.backoff,
        )
    return outcome


def deliver_pass(
    sessions: sessionmaker[Session], config: WebhookConfig, *, clock: Clock = utc_now
) -> PassReport:
    """One pass: record new transitions, fan new events out to the configured URLs and
    attempt every delivery due now once. ``clock`` gives the current time (UTC): tests move
    it instead of sleeping through backoffs."""
    report = PassReport()
    with sessions() as session:
        detected = detect_transitions(
            session, now=clock(), lookback=config.lookback, reopen_window=config.reopen_window
        )
        report.recorded = len(detected.rendered) + len(detected.reviewed)
        report.fanned_out = fan_out(session, config.urls, now=clock())
        for _ in range(PASS_LIMIT):
            claim = claim_next(session, now=clock(), lease=config.lease)
            if claim is None:
                break
            outcome = _attempt(session, claim, config, clock)
            if outcome.error is None:
                report.delivered += 1
                continue
            report.failed += 1
            report.errors.append(
                f"{claim.event_type} {claim.event_id} to {display_url(claim.url)}: {outcome.error}"
            )
            if claim.attempt >= config.backoff.max_attempts:
                report.given_up += 1
    return report


def deliver_forever(
    sessions: sessionmaker[Session],
    config: WebhookConfig,
    stop: threading.Event,
    *,
    on_pass: Callable[[PassReport], None] | None = None,
) -> None:
    """Run a pass every ``poll_seconds`` until ``stop`` is set. A pass that fails on the
    database is logged and the next one tries again."""
    while not stop.is_set():
        try:
            report = deliver_pass(sessions, config)
        except Exception as exc:
            if infrastructure_error(exc) is None:
                raise
            log.warning("webhook delivery pass failed, trying again: %s", exc)
        else:
            if on_pass is not None:
                on_pass(report)
        stop.wait(config.poll_seconds)
