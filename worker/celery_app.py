"""The Celery application: configuration for long GPU tasks.

Postgres is the queue of record; messages carry only job ids. The app is configured lazily
(on first use) from settings, so importing it reads no environment.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import import_modules, worker_init, worker_shutdown

from pixelmill.settings import Settings, get_settings
from worker.sqla_transport import use_fast_polling

RENDER_TASK = "pixelmill.render_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_url = settings.resolved_broker_url
    transport_options: dict[str, Any] = {}
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis re-delivers an unacknowledged message after visibility_timeout: it must be
        # longer than the longest job, or a second worker would start the same job.
        # (A duplicate would be harmless, see worker.claim, but would waste a message.)
        transport_options["visibility_timeout"] = max(6 * 3600, 2 * settings.task_time_limit)
    elif broker_url.startswith(("sqla+", "sqlalchemy+")):
        use_fast_polling()  # see worker.sqla_transport
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.render_queue,
        "task_routes": {RENDER_TASK: {"queue": settings.render_queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        # Results live in Postgres, not in a result backend.
        "task_ignore_result": True,
        # Acknowledge after the task ran: a worker that dies mid-render gives the message back.
        # Safe because claiming a job is idempotent (see worker.claim).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A GPU renders one job at a time: never hoard messages another GPU could take.
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        # Long GPU tasks: interrupt a task past its soft limit (SoftTimeLimitExceeded: the job
        # goes back for another attempt), kill its process past the hard limit.
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        # When the broker connection drops, the broker re-delivers unacknowledged messages:
        # stop the tasks they belong to rather than render them twice (the claim would fence
        # off the loser's writes anyway, but its GPU time would be wasted).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # A pool process loads its model before it reports ready (worker_process_init): that
        # takes far longer than Celery's 4 s default on a GPU, and a replacement process
        # (worker_max_tasks_per_child) that misses it is killed and replaced, forever.
        "worker_proc_alive_timeout": 600,
    }
    if settings.worker_max_tasks_per_child is not None:
        config["worker_max_tasks_per_child"] = settings.worker_max_tasks_per_child
    return config


def _configure_from_environment(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app; configured from ``settings``, or from the environment on first use."""
    app = Celery("pixelmill", include=["worker.tasks"])
    if settings is not None:
        app.conf.update(celery_config(settings))
    else:
        # weak=False: the receiver is a closure that nothing else keeps alive.
        app.on_configure.connect(_configure_from_environment, weak=False)
    return app


# --- metrics (monitoring.worker_hooks): in the worker's main process -----------------------


@import_modules.connect
def _prepare_metrics(**_: Any) -> None:
    """Before the task modules (and with them prometheus-client) are imported: choose and, if
    this process serves the host's metrics, empty the multiprocess directory."""
    from monitoring.worker_hooks import prepare_metrics_dir

    prepare_metrics_dir(get_settings())


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Serve the host's /metrics from the main process (PIXELMILL_METRICS_PORT > 0): it
    outlives its pool processes and never renders."""
    from monitoring.worker_hooks import serve_host_metrics

    serve_host_metrics(get_settings())


@worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    from monitoring.worker_hooks import stop_host_metrics

    stop_host_metrics()
