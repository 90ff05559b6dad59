"""Celery tasks and the per-process worker runtime.

The model is loaded in each pool process (``worker_process_init``), never in the parent: a
CUDA context does not survive fork, and each process owns exactly one GPU.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery.signals import worker_process_init

from worker import app
from worker.celery_app import RENDER_TASK
from worker.render import WorkerRuntime, render_job

log = logging.getLogger(__name__)

_runtime: WorkerRuntime | None = None


def build_runtime() -> WorkerRuntime:
    from db.session import make_engine, make_sessionmaker
    from pixelmill.blocklist import load_blocklist
    from pixelmill.settings import get_settings
    from pixelmill.storage import storage_from_settings
    from worker.pipeline import PipelineCache, resolve_device

    settings = get_settings()
    _quiet_libraries()
    device = resolve_device(settings.device)
    return WorkerRuntime(
        settings=settings,
        sessions=make_sessionmaker(make_engine(settings.resolved_database_url)),
        storage=storage_from_settings(settings),
        pipelines=PipelineCache(device=device, safety_checker=settings.safety_checker),
        name=f"{socket.gethostname()}:{os.getpid()}:{device}",
        # Read at start: a bad blocklist file stops the worker instead of failing every job.
        blocklist=load_blocklist(settings.blocklist_path),
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


@app.task(name=RENDER_TASK)
def render_job_task(job_id: int) -> str:
    return render_job(get_runtime(), job_id)
