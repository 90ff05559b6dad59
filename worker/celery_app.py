"""The Celery application: configuration for long GPU tasks.

Postgres is the queue of record; messages carry only job ids. The app is configured lazily
(on first use) from settings, so importing it reads no environment.
"""

from __future__ import annotations

import warnings
from typing import Any

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import import_modules, worker_init, worker_shutdown

from pixelmill.settings import Settings, get_settings
from pixelmill.tasks import FINISH_TASK, RENDER_TASK, broker_transport_options
from worker import metrics_hooks
from worker.sqla_transport import use_fast_polling

# Celery warns, on every lost broker connection, that cancelling tasks will become its default
# (Celery 6): the setting below is explicit, and stays explicit when the default changes.
warnings.filterwarnings(
    "ignore",
    message=r"\s*In Celery 5.1 we introduced an optional breaking change",
    category=CPendingDeprecationWarning,
)


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_url = settings.resolved_broker_url
    if broker_url.startswith(("sqla+", "sqlalchemy+")):
        use_fast_polling()  # see worker.sqla_transport
    config: dict[str, Any] = {
        "broker_url": broker_url,
        # The same as the dispatcher's (a Redis visibility timeout longer than any job).
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.render_queue,
        "task_routes": {
            RENDER_TASK: {"queue": settings.render_queue},
            FINISH_TASK: {"queue": settings.finishing_queue},
        },
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
        # When the broker connection drops, Celery can cancel (terminate) the tasks whose
        # late acknowledgement it can no longer send. Not here: a render in progress keeps
        # running under its fenced claim (Postgres, not the broker, says who owns a job),
        # records its images and ends its job; the message the broker gives out again then
        # finds the job running or done and is dropped ("skipped"). Terminating it would
        # throw its GPU work away and leave the job to wait out its lease.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
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
    """A Celery app; configured from ``settings``, or from the environment on first use.

    A worker imports the ``include`` modules when it starts: worker.tasks registers the render
    task on worker.main's app (worker.finishing.tasks the finishing task), and Celery shares
    those tasks with every other app made here."""
    app = Celery("pixelmill", include=["worker.tasks", "worker.finishing.tasks"])
    if settings is not None:
        app.conf.update(celery_config(settings))
    else:
        # weak=False: the receiver is a closure that nothing else keeps alive.
        app.on_configure.connect(_configure_from_environment, weak=False)
    return app


# --- metrics (worker.metrics_hooks): in the worker's main process -------------------------


@import_modules.connect
def _prepare_metrics(**_: Any) -> None:
    """Before the task modules (and with them prometheus-client) are imported: choose and, if
    this process serves the host's metrics, empty the multiprocess directory."""
    metrics_hooks.prepare_metrics_dir(get_settings())


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Serve the host's /metrics from the main process (PIXELMILL_METRICS_PORT > 0): it
    outlives its pool processes and never renders."""
    metrics_hooks.serve_host_metrics(get_settings())


@worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    metrics_hooks.stop_host_metrics()
