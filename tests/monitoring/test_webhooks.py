"""Webhook events: the signature a receiver checks, which transitions are detected and when
(once each, however often detection runs), the export's own event, and the settings and
commands, on Postgres and SQLite."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli.main import app
from db.models import Job, JobStatus, ReviewItem, ReviewStatus, RunStatus
from db.webhooks import WebhookEvent
from monitoring.webhooks.delivery import deliver_pass
from monitoring.webhooks.events import detect_transitions
from monitoring.webhooks.signing import SignatureError, signature_header, verify_signature
from pixelmill.settings import get_settings
from pixelmill.storage import LocalStorage
from review.channels.export import export_channels
from review.channels.presets import Preset
from review.channels.sinks import FolderSink
from review.queue import submit
from tests.factories import make_reviewer
from tests.monitoring.webhook_fixtures import SECRET, Clock, webhook_config
from tests.monitoring.webhook_fixtures import any_sessions as any_sessions
from tests.monitoring.webhook_receiver import receiving
from tests.review.factory import make_run
from tests.review.keepers import LEASE, run_with_keepers

BODY = b'{"id":"e1","type":"run.rendered"}'


# --- signing --------------------------------------------------------------------------------


def test_the_signature_is_an_hmac_of_the_timestamp_and_the_exact_body() -> None:
    header = signature_header(SECRET, BODY, 1_800_000_000)
    # What a receiver in any language computes: HMAC-SHA256(secret, "t.body"), hex.
    expected = hmac.new(SECRET, b"1800000000." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1800000000,v1={expected}"
    assert verify_signature(SECRET, BODY, header, now=1_800_000_100) == 1_800_000_000


@pytest.mark.parametrize(
    ("secret", "body", "now", "says"),
    [
        (SECRET, BODY.replace(b"e1", b"e2"), 1_800_000_000, "does not match"),
        (b"another-secret-of-16", BODY, 1_800_000_000, "does not match"),
        (SECRET, BODY, 1_800_000_301, "possible replay"),
        (SECRET, BODY, 1_799_999_699, "possible replay"),
    ],
)
def test_a_changed_body_another_secret_or_an_old_timestamp_is_refused(
    secret: bytes, body: bytes, now: int, says: str
) -> None:
    header = signature_header(SECRET, BODY, 1_800_000_000)
    with pytest.raises(SignatureError, match=says):
        verify_signature(secret, body, header, now=now)


def test_a_malformed_header_is_refused_and_any_matching_v1_is_accepted() -> None:
    for header in ("", "v1=abc", "t=abc,v1=abc", "t=1800000000"):
        with pytest.raises(SignatureError, match="expected 't=TIMESTAMP,v1=HEX'"):
            verify_signature(SECRET, BODY, header, now=1_800_000_000)
    good = signature_header(SECRET, BODY, 1_800_000_000).split(",")[1]
    assert verify_signature(SECRET, BODY, f"t=1800000000,v1=00ff,{good}", now=1_800_000_000)


# --- detection ------------------------------------------------------------------------------


def events_of(session: Session, run_id: int) -> dict[str, WebhookEvent]:
    rows = session.scalars(select(WebhookEvent).where(WebhookEvent.run_id == run_id))
    return {event.type: event for event in rows}


def detect(session: Session, clock: Clock, reopen_seconds: float = 60) -> None:
    detect_transitions(
        session,
        now=clock(),
        lookback=timedelta(days=30),
        reopen_window=timedelta(seconds=reopen_seconds),
    )


def test_rendered_is_recorded_once_when_the_last_job_ends(
    any_sessions: sessionmaker[Session],
) -> None:
    clock = Clock()
    with any_sessions() as session:
        made = make_run(session, items=1, templates=("a", "b"), run_status=RunStatus.ACTIVE)
        run_id = made.run.id
        detect(session, clock)  # active: its produce or its jobs may not be over
        assert events_of(session, run_id) == {}
        made.run.status = RunStatus.CANCELLED
        made.jobs[0].status = JobStatus.RUNNING  # cancelled, but a job is still rendering
        session.commit()
        detect(session, clock)
        assert events_of(session, run_id) == {}
        made.jobs[0].status = JobStatus.DEAD
        session.commit()
        detect(session, clock)
        detect(session, clock)
        [event] = events_of(session, run_id).values()
        assert event.type == "run.rendered" and len(event.event_id) == 36
        assert event.data["status"] == "cancelled"
        assert (event.data["jobs"]["dead"], event.data["jobs"]["done"]) == (1, 1)
        assert event.data["images"] == 4  # both jobs' rows (the factory gives each 2 seeds)


def test_reviewed_waits_for_every_item_and_the_reopen_window(
    any_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    clock = Clock()
    with any_sessions() as session:
        reviewer = make_reviewer(session)
        made = run_with_keepers(
            session, LocalStorage(tmp_path / "images"), reviewer.id, items=2, open_items=1
        )
        run_id = made.run.id
        detect(session, clock)
        assert set(events_of(session, run_id)) == {"run.rendered"}  # one item still open

        last = session.scalars(
            select(ReviewItem).where(
                ReviewItem.run_id == run_id, ReviewItem.status != ReviewStatus.DONE
            )
        ).one()
        submit(session, last.id, reviewer_id=reviewer.id, lease=LEASE)
        detect(session, clock)  # its reviewer may still reopen it
        assert set(events_of(session, run_id)) == {"run.rendered"}

        clock.advance(61)
        detect(session, clock)
        detect(session, clock)
        reviewed = events_of(session, run_id)["run.reviewed"]
        # 3 items of 2 images: each item's first kept, the other rejected.
        assert reviewed.data["items"] == 3
        assert (reviewed.data["kept"], reviewed.data["rejected"]) == (3, 3)


def test_reviewed_waits_for_items_the_queue_has_not_taken_in_yet(
    any_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    clock = Clock()
    with any_sessions() as session:
        reviewer = make_reviewer(session)
        made = run_with_keepers(session, LocalStorage(tmp_path / "images"), reviewer.id, items=2)
        # An item whose jobs ended but that the queue has not taken in yet: it has no row.
        item_id = made.items[1].id
        session.execute(
            delete(ReviewItem).where(
                ReviewItem.run_id == made.run.id, ReviewItem.item_id == item_id
            )
        )
        session.commit()
        clock.advance(61)
        detect(session, clock)
        assert "run.reviewed" not in events_of(session, made.run.id)
        assert session.scalar(select(Job.id).where(Job.item_id == item_id)) is not None


# --- the export's event ---------------------------------------------------------------------


def test_each_export_written_is_an_event_with_its_manifest(
    any_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path / "images")
    preset = Preset(name="shop-png", format="png", longer_side=64)
    target = tmp_path / "export"
    with any_sessions() as session:
        reviewer = make_reviewer(session)
        made = run_with_keepers(session, storage, reviewer.id, items=2)
        first = export_channels(session, made.run, storage, [preset], FolderSink(target))
        second = export_channels(session, made.run, storage, [preset], FolderSink(target))
    assert (first.files, second.files) == (2, 2)

    with receiving() as receiver:
        report = deliver_pass(any_sessions, webhook_config(receiver.url), clock=Clock())
    # rendered and the 2 exports (reviewed: not before the reopen window has passed)
    assert (report.recorded, report.delivered) == (1, 3)
    events = [json.loads(request.body) for request in receiver.requests]
    exports = [event for event in events if event["type"] == "export.written"]
    assert len(exports) == 2 and exports[0]["id"] != exports[1]["id"]
    data = exports[0]["data"]
    assert data["location"] == first.location and data["manifests"] == first.manifests
    assert any(m.endswith("manifest.jsonl") for m in data["manifests"])
    assert (data["files"], data["written"], data["already_there"]) == (2, 2, 0)
    assert exports[1]["data"]["channels"] == {"shop-png": {"written": 0, "already_there": 2}}
    assert exports[0]["run"] == {"id": made.run.id, "name": made.run.name}


# --- settings and commands ------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "example.com/hook", "http:///hook"])
def test_a_webhook_url_that_is_not_http_names_the_setting(url: str) -> None:
    with pytest.raises(ValidationError, match="webhook_urls") as raised:
        get_settings(webhook_urls=f"https://ok.example/hook, {url}", webhook_secret="s" * 16)
    assert repr(url) in str(raised.value)


def test_webhook_urls_are_a_list_or_json_and_need_a_secret() -> None:
    settings = get_settings(
        webhook_urls="https://a.example/h  http://b.example:8080/h", webhook_secret="s" * 16
    )
    assert settings.webhook_urls == ["https://a.example/h", "http://b.example:8080/h"]
    assert "s" * 16 not in repr(settings)  # a SecretStr: never printed
    assert get_settings(webhook_urls='["https://a.example/h"]', webhook_secret="s" * 16)
    with pytest.raises(ValidationError, match="PIXELMILL_WEBHOOK_SECRET is required"):
        get_settings(webhook_urls="https://a.example/h")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        get_settings(webhook_urls="https://a.example/h", webhook_secret="short")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "WEBHOOK_URLS", "WEBHOOK_SECRET"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_the_commands_refuse_bad_settings_in_one_line(workdir: Path) -> None:
    code, out = invoke(
        "webhooks",
        "deliver",
        "--once",
        env={"PIXELMILL_WEBHOOK_URLS": "ftp://example.com/x", "PIXELMILL_WEBHOOK_SECRET": "s" * 16},
    )
    assert code == 2 and "PIXELMILL_WEBHOOK_URLS" in out and "'ftp://example.com/x'" in out
    code, out = invoke("webhooks", "deliver", "--once")
    assert code == 2 and "PIXELMILL_WEBHOOK_URLS is empty" in out
    assert "Traceback" not in out


def test_deliver_once_list_and_retry_on_the_embedded_database(workdir: Path) -> None:
    from db.session import make_engine, make_sessionmaker

    assert invoke("db", "upgrade")[0] == 0
    engine = make_engine(f"sqlite:///{workdir / 'var' / 'pixelmill.db'}")
    with make_sessionmaker(engine)() as session:
        make_run(session, name="night-7", items=1)
    engine.dispose()
    with receiving(statuses=[500]) as receiver:
        env = {
            "PIXELMILL_WEBHOOK_URLS": f"http://user:pw@127.0.0.1:{receiver.port}/hook",
            "PIXELMILL_WEBHOOK_SECRET": "s" * 16,
            "PIXELMILL_WEBHOOK_MAX_ATTEMPTS": "1",
        }
        code, out = invoke("webhooks", "deliver", "--once", env=env)
        assert code == 0, out
        assert "1 events recorded, 0 delivered, 1 attempts failed (1 given up)" in out
        assert "HTTP 500" in out and "pw@" not in out
        code, out = invoke("webhooks", "list", env=env)
        assert code == 0 and "run.rendered" in out and "(run night-7)" in out
        assert "1 attempts, given up, last: HTTP 500" in out and "pw@" not in out
        assert invoke("webhooks", "deliver", "--once", env=env) == (0, "")
        assert len(receiver.requests) == 1  # given up: not tried again by itself
        code, out = invoke("webhooks", "retry", env=env)
        assert code == 0 and "1 deliveries given up are due again" in out
        code, out = invoke("webhooks", "deliver", "--once", env=env)
        assert code == 0 and "0 events recorded, 1 delivered, 0 attempts failed" in out, out
    assert invoke("webhooks", "list", env=env)[1].strip() == (
        "every webhook event has been delivered"
    )
    # The URL's user name and password are sent as Basic authentication, not in the URL.
    assert receiver.requests[1].headers["authorization"] == "Basic dXNlcjpwdw=="
    assert receiver.requests[1].path == "/hook"
