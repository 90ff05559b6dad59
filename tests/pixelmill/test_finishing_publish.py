"""The kernel's side of finishing: the task a submit publishes, on the real Redis broker, and
the keys finished images are stored under."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from kombu import Connection as BrokerConnection

from pixelmill.approved import APPROVED_PREFIX, approved_key, upscaled_key
from pixelmill.settings import get_settings
from pixelmill.tasks import FINISH_TASK, finishing_enabled, publish_finishing
from tests.conftest import REDIS_URL, free_port, require_service


@pytest.fixture
def finishing_queue() -> Iterator[str]:
    name = f"finishing-test-{uuid.uuid4().hex[:10]}"
    yield name
    with BrokerConnection(REDIS_URL) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(name)


def test_a_submit_queues_its_item_on_the_finishing_queue(
    finishing_queue: str, tmp_path: Path
) -> None:
    require_service("Redis", REDIS_URL, 6379)
    settings = get_settings(
        data_dir=tmp_path,
        broker_url=REDIS_URL,
        finishing_queue=finishing_queue,
        caption_model="tiny",
        review_reopen_seconds=60,
    )
    before = time.time()
    assert publish_finishing(settings, 42) is True
    with BrokerConnection(REDIS_URL) as conn:
        queue = conn.SimpleQueue(finishing_queue, no_ack=True)
        message = queue.get(timeout=10)
        queue.close()
    assert message.headers["task"] == FINISH_TASK
    args, kwargs, _embed = message.payload
    assert args == [42] and kwargs == {}
    # Not before the reviewer's reopen window has passed.
    eta = message.headers["eta"]
    assert eta is not None
    assert datetime.fromisoformat(eta).timestamp() >= before + 59


def test_nothing_is_queued_while_finishing_is_off(tmp_path: Path) -> None:
    """No model configured: no broker is even contacted (this one does not exist)."""
    settings = get_settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    assert not finishing_enabled(settings)
    assert publish_finishing(settings, 1) is False


def test_a_broker_that_is_away_does_not_fail_the_submit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = get_settings(
        data_dir=tmp_path,
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        upscale_model="tiny",
        finishing_queue="finishing-nowhere",
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pixelmill.tasks"):
        assert publish_finishing(settings, 7) is False
    assert time.monotonic() - started < 30
    assert "review item 7: finishing not queued" in caplog.text
    assert "pixelmill finish" in caplog.text


def test_finished_images_have_keys_that_follow_from_their_source() -> None:
    key = "runs/3/jobs/17/1234.png"
    sha = "0123456789abcdef" * 4
    assert approved_key(key) == f"{APPROVED_PREFIX}{key}"
    assert upscaled_key(key, scale=4, model_sha256=sha) == (
        "approved/runs/3/jobs/17/1234.x4-0123456789ab.png"
    )
    assert upscaled_key(key, scale=2, model_sha256=sha) != upscaled_key(
        key, scale=4, model_sha256=sha
    )
    assert upscaled_key(key, scale=4, model_sha256="f" * 64) != upscaled_key(
        key, scale=4, model_sha256=sha
    )


def test_the_upscale_scale_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("PIXELMILL_UPSCALE_SCALE", "2")
    assert get_settings().upscale_scale == 2
    monkeypatch.setenv("PIXELMILL_UPSCALE_SCALE", "3")
    with pytest.raises(ValidationError, match="must be 2 or 4"):
        get_settings()
