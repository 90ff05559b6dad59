"""The broker's side of the contract between the dispatcher and the workers.

The dispatcher publishes job ids under :data:`RENDER_TASK`; the workers consume them. Neither
imports the other: both take the name and the broker options from here. The review app
publishes a submitted item's id under :data:`FINISH_TASK` (:func:`publish_finishing`) the
same way, for the workers' finishing queue.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from pixelmill.outages import infrastructure_error
from pixelmill.settings import Settings

RENDER_TASK = "pixelmill.render_job"
# A submitted review item's keepers: upscaled and captioned (worker.finishing).
FINISH_TASK = "pixelmill.finish_item"

log = logging.getLogger(__name__)


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options both publisher and consumer must agree on."""
    options: dict[str, Any] = {}
    if settings.resolved_broker_url.startswith(("redis://", "rediss://")):
        # Redis re-delivers an unacknowledged message after visibility_timeout: it must be
        # longer than the longest job, or a second worker would start the same job.
        # (A duplicate would be harmless, since claiming is fenced, but would waste a message.)
        options["visibility_timeout"] = max(6 * 3600, 2 * settings.task_time_limit)
    return options


def publisher_app(settings: Settings) -> Celery:
    """A Celery app that only publishes render tasks (the dispatcher's): no task modules."""
    app = Celery("pixelmill-dispatch")
    app.conf.update(
        broker_url=settings.resolved_broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_routes={RENDER_TASK: {"queue": settings.render_queue}},
    )
    return app


def finishing_enabled(settings: Settings) -> bool:
    """Whether keepers are finished at all: an upscaler or a captioner is configured."""
    return bool(settings.upscale_model or settings.caption_model)


_finishing_publishers: dict[tuple[str, str], Celery] = {}
_publishers_lock = threading.Lock()


def _finishing_publisher(settings: Settings) -> Celery:
    """One publishing app per broker and queue, kept: its connection pool is reused by every
    submit of a long-running review app."""
    key = (settings.resolved_broker_url, settings.finishing_queue)
    with _publishers_lock:
        app = _finishing_publishers.get(key)
        if app is None:
            app = publisher_app(settings)
            app.conf.task_routes = {FINISH_TASK: {"queue": settings.finishing_queue}}
            _finishing_publishers[key] = app
        return app


def publish_finishing(settings: Settings, review_item_id: int) -> bool:
    """Queue the finishing of a submitted item's keepers, once its reopen window has passed
    (a reopened item's keepers may still change; the task finishes what is kept when it
    runs). Call it after the submit is committed.

    Returns whether it was queued: False when finishing is off, or when the broker refused
    (logged; the submit stands, and ``pixelmill finish RUN`` finishes what was missed)."""
    if not finishing_enabled(settings):
        return False
    try:
        _finishing_publisher(settings).send_task(
            FINISH_TASK,
            args=[review_item_id],
            queue=settings.finishing_queue,
            countdown=settings.review_reopen_seconds or None,
            # A broker that is away must not hold the reviewer's request for long.
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:
        outage = infrastructure_error(exc)
        if outage is None:
            raise
        log.warning(
            "review item %s: finishing not queued (%s); `pixelmill finish` catches up",
            review_item_id,
            outage,
        )
        return False
    return True
