"""The broker's side of the contract between the dispatcher and the workers.

The dispatcher publishes job ids under :data:`RENDER_TASK`; the workers consume them. Neither
imports the other: both take the name and the broker options from here.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from pixelmill.settings import Settings

RENDER_TASK = "pixelmill.render_job"


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
