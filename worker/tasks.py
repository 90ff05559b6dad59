"""Celery tasks and the per-process worker runtime.

The model is loaded in each pool process (``worker_process_init``), never in the parent: a
CUDA context does not survive fork, and each process owns exactly one GPU.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Reject
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
)

from pixelmill.outages import OutageBackoff, RetryBackoff, infrastructure_error
from pixelmill.tasks import RENDER_TASK
from worker import metrics_hooks
from worker.main import app
from worker.render import WorkerRuntime, render_job

if TYPE_CHECKING:
    from pixelmill.settings import Settings

log = logging.getLogger(__name__)

_runtime: WorkerRuntime | None = None


def build_runtime(settings: Settings | None = None, *, scoring: bool = True) -> WorkerRuntime:
    """The worker's runtime from ``settings`` (default: the environment's); ``scoring=False``
    leaves the scorer out (a command that renders without recording, such as reproduce)."""
    from db.session import make_engine, make_sessionmaker
    from pixelmill.blocklist import load_blocklist
    from pixelmill.settings import get_settings
    from pixelmill.storage import storage_from_settings
    from worker.families import FamilyOptions
    from worker.loading import PipelineCache, resolve_device
    from worker.scoring.configured import scorer_from_settings

    settings = settings or get_settings()
    _quiet_libraries()
    device = resolve_device(settings.device)
    return WorkerRuntime(
        settings=settings,
        sessions=make_sessionmaker(make_engine(settings.resolved_database_url)),
        storage=storage_from_settings(settings),
        pipelines=PipelineCache(
            device=device,
            safety_checker=settings.safety_checker,
            max_models=settings.max_loaded_models,
            config=settings.model_config_dir,
            compile_unet=settings.torch_compile,
            hash_cache=settings.model_hash_cache,
            family_options=FamilyOptions.from_settings(settings),
        ),
        name=f"{socket.gethostname()}:{os.getpid()}:{device}",
        # Read at start: a bad blocklist file stops the worker instead of failing every job.
        blocklist=load_blocklist(settings.blocklist_path),
        # Loaded once per process, like the blocklist (a scorer that cannot load stops the
        # worker); None when no scorer is configured.
        scorer=scorer_from_settings(settings) if scoring else None,
    )


def _quiet_libraries() -> None:
    """diffusers and transformers log progress bars and notices per call; a worker logs one
    line per event instead. (Prompts over CLIP's window are reported by the producer.)"""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def get_runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None:
        _runtime = build_runtime()
    return _runtime


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Load the default model before the first message arrives, so it renders at full speed."""
    from worker.models import resolve_model

    runtime = get_runtime()
    try:
        runtime.pipelines.get(resolve_model(runtime.settings.model, runtime.settings))
    except Exception:  # a bad default model must not stop jobs that name another one
        log.exception("could not preload model %r", runtime.settings.model)


@worker_process_init.connect
def _start_metrics(**_: Any) -> None:
    """After the warm-up (connected first): its GPU memory is the first value recorded."""
    metrics_hooks.on_pool_process_start()


# A message whose job could not even be claimed or ended because the database is away goes
# back to the broker after this process's pause (longer while the outage lasts), instead of
# being acknowledged and leaving its job queued with no message.
_outages = OutageBackoff(RetryBackoff(base=1.0, cap=30.0))


@app.task(name=RENDER_TASK)
def render_job_task(job_id: int) -> str:
    try:
        # The job's tail (last uploads, rows, done) finishes while the next message renders.
        outcome = render_job(get_runtime(), job_id, defer_tail=True)
    except Exception as exc:
        outage = infrastructure_error(exc)
        if outage is None:
            raise
        _give_message_back(job_id, outage)
    _outages.succeeded()
    return outcome


def _give_message_back(job_id: int, outage: Exception) -> NoReturn:
    pause = _outages.failed()
    log.warning("job %s: %s; its message goes back to the broker in %.1f s", job_id, outage, pause)
    time.sleep(pause)
    raise Reject(str(outage), requeue=True)


# A pool process that exits (warm shutdown, max_tasks_per_child) first finishes its job's
# tail; past this many seconds the job's lease covers it (re-queued when it expires).
TAIL_DRAIN_SECONDS = 120.0


@worker_process_shutdown.connect
def _drain_tail(**_: Any) -> None:
    if _runtime is not None:
        _runtime.tails.wait(timeout=TAIL_DRAIN_SECONDS)


# --- metrics (worker.metrics_hooks): in the pool processes --------------------------------


@worker_process_shutdown.connect
def _mark_dead(**_: Any) -> None:
    """This pool process exits: its live gauges (GPU memory) stop counting."""
    metrics_hooks.on_pool_process_exit()


# Matched by name: `sender` is the registered task, not the proxy `@app.task` returned here.
@task_prerun.connect
def _job_started(task_id: str, task: Any, **_: Any) -> None:
    if task.name == RENDER_TASK:
        metrics_hooks.on_task_start(task_id)


@task_postrun.connect
def _job_ended(task_id: str, task: Any, retval: Any = None, **_: Any) -> None:
    if task.name == RENDER_TASK:
        metrics_hooks.on_task_end(task_id, retval)
