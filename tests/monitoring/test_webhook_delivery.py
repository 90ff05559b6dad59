"""Webhook delivery against a real HTTP receiver on a loopback port, on Postgres and SQLite: a
receiver that refuses connections, then fails, then accepts gets every event, signed, with
backoff between attempts; concurrent deliverers send each event once."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker
from db.webhooks import WebhookDelivery, WebhookEvent
from monitoring.webhooks.delivery import PassReport, deliver_pass
from monitoring.webhooks.events import detect_transitions
from monitoring.webhooks.outbox import claim_next, fan_out, retry_given_up, undelivered
from monitoring.webhooks.signing import verify_signature
from tests.conftest import free_port
from tests.monitoring.webhook_fixtures import (
    SECRET,
    Clock,
    aware,
    deliveries,
    webhook_config,
)
from tests.monitoring.webhook_fixtures import any_sessions as any_sessions
from tests.monitoring.webhook_receiver import Received, receiving
from tests.review.factory import make_run


def finished_run(sessions: sessionmaker[Session], name: str = "night-1") -> int:
    """A finished run of 2 items x 2 templates, 2 seeds each: 4 jobs done, 8 images."""
    with sessions() as session:
        return make_run(session, name=name, items=2, seeds=2).run.id


def check_signed(request: Received) -> dict[str, object]:
    """The request's signature verifies over its exact body (at the time it was signed);
    its body as JSON."""
    header = request.headers["pixelmill-signature"]
    signed_at = int(header.split(",")[0].removeprefix("t="))
    verify_signature(SECRET, request.body, header, now=signed_at)
    event: dict[str, object] = json.loads(request.body)
    assert request.headers["pixelmill-event-id"] == event["id"]
    assert request.headers["pixelmill-event-type"] == event["type"]
    assert request.headers["content-type"] == "application/json"
    return event


def test_a_receiver_down_then_failing_then_up_gets_the_event(
    any_sessions: sessionmaker[Session],
) -> None:
    run_id = finished_run(any_sessions)
    port = free_port()  # nothing listens there yet: connections are refused
    config = webhook_config(f"http://127.0.0.1:{port}/hooks/pixelmill")
    clock = Clock()
    start = clock.now

    report = deliver_pass(any_sessions, config, clock=clock)
    assert (report.recorded, report.delivered, report.failed) == (1, 0, 1)
    [row] = deliveries(any_sessions)
    assert row.attempts == 1 and row.last_status is None and row.delivered_at is None
    assert "refused" in (row.last_error or "").lower()
    assert aware(row.next_attempt_at) == start + timedelta(seconds=10)

    clock.advance(9)  # not due yet: nothing is attempted
    assert deliver_pass(any_sessions, config, clock=clock) == PassReport()

    with receiving(port, statuses=[500]) as receiver:
        clock.advance(1)
        report = deliver_pass(any_sessions, config, clock=clock)
        assert (report.delivered, report.failed) == (0, 1)
        [row] = deliveries(any_sessions)
        assert (row.attempts, row.last_status) == (2, 500)
        # The backoff doubles: 20 s after the second attempt.
        assert aware(row.next_attempt_at) == start + timedelta(seconds=30)
        clock.advance(19)
        assert deliver_pass(any_sessions, config, clock=clock).delivered == 0
        assert len(receiver.requests) == 1
        clock.advance(1)
        assert deliver_pass(any_sessions, config, clock=clock).delivered == 1
        clock.advance(3600)
        assert deliver_pass(any_sessions, config, clock=clock) == PassReport()

    first, second = receiver.requests
    assert (first.answered, second.answered) == (500, 200)
    assert first.body == second.body  # the same bytes on every attempt
    event = check_signed(second)
    assert check_signed(first) == event
    assert event["type"] == "run.rendered"
    assert event["run"] == {"id": run_id, "name": "night-1"}
    data = event["data"]
    assert isinstance(data, dict)
    assert data["status"] == "finished" and data["images"] == 8
    assert data["jobs"] == {
        "pending": 0, "queued": 0, "running": 0, "done": 4, "failed": 0, "dead": 0,
        "blocked": 0, "cancelled": 0,
    }  # fmt: skip
    [row] = deliveries(any_sessions)
    assert row.attempts == 3 and row.last_status == 200 and row.delivered_at is not None
    with any_sessions() as session:
        assert undelivered(session) == (0, [])


def _deliver_at_once(sessions: sessionmaker[Session], clock: Clock, *urls: str) -> None:
    """Two deliverers, started at the same moment, each running passes until nothing is due."""
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def deliverer() -> None:
        try:
            barrier.wait(timeout=30)
            while deliver_pass(sessions, webhook_config(*urls), clock=clock) != PassReport():
                pass
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=deliverer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures


def test_concurrent_deliverers_send_each_event_once_to_each_url(
    any_sessions: sessionmaker[Session],
) -> None:
    runs = [finished_run(any_sessions, name=f"night-{n}") for n in range(4)]
    clock = Clock()
    with receiving() as receiver:
        urls = (receiver.url + "/a", receiver.url + "/b")
        _deliver_at_once(any_sessions, clock, *urls)
        _deliver_at_once(any_sessions, clock, *urls)  # detecting again records nothing

    sent = [(check_signed(r)["id"], r.path) for r in receiver.requests]
    assert len(sent) == len(set(sent)) == 2 * len(runs)
    with any_sessions() as session:
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == len(runs)
    assert all(row.attempts == 1 and row.delivered_at for row in deliveries(any_sessions))


def test_a_delivery_is_given_up_after_its_attempts_and_retried_on_request(
    any_sessions: sessionmaker[Session],
) -> None:
    finished_run(any_sessions)
    clock = Clock()
    with receiving(statuses=[503, 503, 503]) as receiver:
        config = webhook_config(receiver.url, max_attempts=2)
        assert deliver_pass(any_sessions, config, clock=clock).failed == 1
        clock.advance(10)
        report = deliver_pass(any_sessions, config, clock=clock)
        assert (report.failed, report.given_up) == (1, 1)
        clock.advance(24 * 3600)  # given up: never due again by itself
        assert deliver_pass(any_sessions, config, clock=clock) == PassReport()
        with any_sessions() as session:
            total, [listed] = undelivered(session)
            assert total == 1 and listed.next_attempt_at is None and listed.attempts == 2
            assert listed.last_status == 503 and listed.last_error == "HTTP 503 Service Unavailable"
            assert retry_given_up(session, now=clock()) == 1
        assert deliver_pass(any_sessions, config, clock=clock).failed == 1  # the third 503
        clock.advance(10)
        assert deliver_pass(any_sessions, config, clock=clock).delivered == 1
    assert [r.answered for r in receiver.requests] == [503, 503, 503, 200]


@pytest.mark.parametrize("status", [302, 307, 404])
def test_an_answer_other_than_2xx_is_not_a_delivery(
    any_sessions: sessionmaker[Session],
    status: int,
) -> None:
    finished_run(any_sessions)
    with receiving(statuses=[status]) as receiver:
        report = deliver_pass(any_sessions, webhook_config(receiver.url), clock=Clock())
    assert (report.delivered, report.failed) == (0, 1)
    assert f"HTTP {status}" in report.errors[0]
    # A redirect is not followed: the receiver saw one request, the POST.
    assert [r.answered for r in receiver.requests] == [status]
    [row] = deliveries(any_sessions)
    assert row.delivered_at is None and row.last_status == status


def test_a_claim_skips_a_delivery_another_deliverer_holds(fresh_database_url: str) -> None:
    """Postgres: a delivery row locked by another transaction is skipped, not waited for
    (FOR UPDATE SKIP LOCKED); lock_timeout turns a wait into an error instead of a hang."""
    engine = make_engine(fresh_database_url)
    sessions = make_sessionmaker(engine)
    try:
        finished_run(sessions, name="night-1")
        finished_run(sessions, name="night-2")
        clock = Clock()
        with sessions() as session:
            detect_transitions(
                session, now=clock(), lookback=timedelta(days=1), reopen_window=timedelta(0)
            )
            fan_out(session, ["http://127.0.0.1:9/hook"], now=clock())
        first, second = (row.id for row in deliveries(sessions))
        with sessions() as holder, sessions() as deliverer:
            holder.execute(
                select(WebhookDelivery.id).where(WebhookDelivery.id == first).with_for_update()
            )
            deliverer.execute(text("SET lock_timeout = '5s'"))
            claim = claim_next(deliverer, now=clock(), lease=timedelta(minutes=1))
            assert claim is not None and claim.delivery_id == second
            assert claim_next(deliverer, now=clock(), lease=timedelta(minutes=1)) is None
            holder.rollback()
        with sessions() as again:
            claim = claim_next(again, now=clock(), lease=timedelta(minutes=1))
        assert claim is not None and claim.delivery_id == first and claim.attempt == 1
    finally:
        engine.dispose()


def test_events_recorded_while_no_url_is_configured_wait_for_one(
    any_sessions: sessionmaker[Session],
) -> None:
    finished_run(any_sessions)
    clock = Clock()
    report = deliver_pass(any_sessions, webhook_config(), clock=clock)
    assert (report.recorded, report.fanned_out, report.delivered) == (1, 0, 0)
    with receiving() as receiver:
        report = deliver_pass(any_sessions, webhook_config(receiver.url), clock=clock)
    assert (report.recorded, report.fanned_out, report.delivered) == (0, 1, 1)
    assert check_signed(receiver.requests[0])["type"] == "run.rendered"
