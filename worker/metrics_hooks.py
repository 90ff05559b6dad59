"""Metrics wiring of a Celery render worker, called from Celery's signals (worker.celery_app,
worker.tasks) and from the ``--gpus`` launcher (worker.launch).

Which process does what, on one worker host:

- the process that serves the host's ``/metrics`` (``PIXELMILL_METRICS_PORT`` > 0) empties the
  multiprocess directory before anything writes to it and serves the merged metrics: the
  Celery main process of ``celery -A worker.main worker``, or the launcher of ``pixelmill worker
  --gpus`` (which starts its Celery workers with ``PIXELMILL_METRICS_PORT=0``);
- every pool process records into its own files and marks itself dead when it exits.

This module imports no prometheus-client at import time: it must be imported before
``PROMETHEUS_MULTIPROC_DIR`` is decided.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixelmill.metrics_multiprocess import (
    clean_multiprocess_dir,
    ensure_multiprocess_mode,
    mark_process_dead,
    multiprocess_dir,
    use_multiprocess_dir,
)

if TYPE_CHECKING:
    from pixelmill.metrics_server import MetricsServer
    from pixelmill.settings import Settings

log = logging.getLogger(__name__)

# What render_job returns (worker.render), plus `error` for a task that raised.
JOB_OUTCOMES = ("done", "skipped", "blocked", "failed", "retry", "dead", "error")

_server: MetricsServer | None = None
_task_started: dict[str, float] = {}


def prepare_metrics_dir(settings: Settings) -> Path | None:
    """Decide this host's multiprocess directory before prometheus-client is imported.

    ``PROMETHEUS_MULTIPROC_DIR`` from the environment wins; else, when this process serves the
    host's metrics, ``settings.resolved_prometheus_multiproc_dir``. The serving process empties
    it. Returns the directory, or None (metrics stay in each process, unserved)."""
    path = multiprocess_dir()
    if path is None and settings.metrics_port:
        path = settings.resolved_prometheus_multiproc_dir
    if path is None:
        return None
    path = use_multiprocess_dir(path)
    if settings.metrics_port:
        clean_multiprocess_dir(path)
    ensure_multiprocess_mode()
    return path


def serve_host_metrics(settings: Settings) -> MetricsServer | None:
    """Start this host's ``/metrics`` server if ``settings.metrics_port`` asks for one."""
    global _server
    if not settings.metrics_port or _server is not None:
        return _server
    from pixelmill.metrics_server import start_metrics_server

    _server = start_metrics_server(settings.metrics_port)
    return _server


def stop_host_metrics() -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


def on_pool_process_start() -> None:
    """A pool process starts: create the labelled series at zero, so rates start from 0
    instead of appearing with the first event."""
    from worker import metrics

    for outcome in metrics.IMAGE_OUTCOMES:
        metrics.IMAGES.labels(outcome)
    for outcome in JOB_OUTCOMES:
        metrics.JOBS_FINISHED.labels(outcome)
    record_gpu_memory()


def on_pool_process_exit() -> None:
    mark_process_dead(os.getpid())


def on_task_start(task_id: str) -> None:
    _task_started[task_id] = time.monotonic()


def on_task_end(task_id: str, retval: Any) -> None:
    from worker import metrics

    started = _task_started.pop(task_id, None)
    if retval == "deferred":
        # worker.render counts the job and its duration when its tail ends.
        record_gpu_memory()
        return
    if started is not None:
        metrics.JOB_SECONDS.observe(time.monotonic() - started)
    outcome = retval if isinstance(retval, str) and retval in JOB_OUTCOMES else "error"
    metrics.JOBS_FINISHED.labels(outcome).inc()
    record_gpu_memory()


def gpu_label(index: int) -> str:
    """The host's name for CUDA device ``index`` of this process: its entry in
    CUDA_VISIBLE_DEVICES (each `--gpus` worker sees only its own GPU, as cuda:0), else the
    index itself."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    if 0 <= index < len(visible) and visible[index]:
        return visible[index]
    return str(index)


def record_gpu_memory(index: int | None = None) -> None:
    """Set pixelmill_gpu_memory_bytes{gpu} to the memory the CUDA caching allocator holds on
    device ``index`` (default: the current device); nothing without CUDA.

    torch is only consulted if this process already imported it: metrics never load it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    from worker import metrics

    index = torch.cuda.current_device() if index is None else index
    metrics.GPU_MEMORY_BYTES.labels(gpu_label(index)).set(torch.cuda.memory_reserved(index))
