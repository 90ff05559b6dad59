"""Starting render workers: one Celery worker process per GPU.

Each GPU gets its own ``celery -A worker.main worker`` process (prefork pool, concurrency 1) that
sees only its device (``CUDA_VISIBLE_DEVICES``) and so renders on ``cuda`` (its device 0).
The model is loaded in the pool process (``worker_process_init``); this module, the launching
parent, imports no torch and never touches CUDA. With ``PIXELMILL_METRICS_PORT`` set, the
launcher serves the host's merged Prometheus metrics (see worker.metrics_hooks).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

_GPU_RE = re.compile(r"\d+|GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Za-z/-]+")

REPO_ROOT = Path(__file__).resolve().parent.parent

# The module holding the worker's Celery app: ``celery -A CELERY_APP worker``.
CELERY_APP = "worker.main"


def parse_gpus(text: str) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; GPU indexes or UUIDs (``GPU-…``, ``MIG-…``), no repeats."""
    gpus = [part.strip() for part in text.split(",") if part.strip()]
    if not gpus:
        raise ValueError("--gpus: name at least one GPU, e.g. --gpus 0,1")
    for gpu in gpus:
        if not _GPU_RE.fullmatch(gpu):
            raise ValueError(f"--gpus: {gpu!r} is not a GPU index or UUID")
    repeated = sorted({gpu for gpu in gpus if gpus.count(gpu) > 1})
    if repeated:
        raise ValueError(f"--gpus: GPU listed twice: {', '.join(repeated)}")
    return gpus


def served_queues(render_queue: str, finishing_queue: str) -> str:
    """The ``--queues`` of a worker: it renders, and finishes keepers between renders."""
    return ",".join(dict.fromkeys([render_queue, finishing_queue]))


def worker_argv(
    *,
    queue: str,
    hostname: str,
    concurrency: int = 1,
    loglevel: str = "INFO",
) -> list[str]:
    """Arguments of ``celery -A worker.main`` (:data:`CELERY_APP`), or of ``app.worker_main``,
    for a render worker."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--queues={queue}",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]


def gpu_worker_env(gpu: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the worker process for ``gpu``: only that device is visible, and
    PIXELMILL_DEVICE is ``cuda`` (the one visible device)."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    env["PIXELMILL_DEVICE"] = "cuda"
    # Devices numbered as nvidia-smi shows them, so CUDA_VISIBLE_DEVICES means what it says.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def gpu_worker_command(
    gpu: str, *, queue: str, name: str = "pixelmill", loglevel: str = "INFO"
) -> list[str]:
    """The command line of the worker process for ``gpu`` (node name ``NAME-gpuN@host``)."""
    hostname = f"{name}-gpu{gpu}@%h"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        CELERY_APP,
        *worker_argv(queue=queue, hostname=hostname, concurrency=1, loglevel=loglevel),
    ]


def start_gpu_workers(
    gpus: Sequence[str],
    *,
    queue: str,
    name: str = "pixelmill",
    loglevel: str = "INFO",
    base_env: Mapping[str, str] | None = None,
    popen: Callable[..., Any] = subprocess.Popen,
) -> list[Any]:
    """Start one worker process per GPU; returns the processes (``popen``'s results)."""
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"a GPU is listed twice: {list(gpus)}")
    return [
        popen(
            gpu_worker_command(gpu, queue=queue, name=name, loglevel=loglevel),
            env=gpu_worker_env(gpu, base_env),
            cwd=REPO_ROOT,
        )
        for gpu in gpus
    ]


def run_gpu_workers(
    gpus: Sequence[str], *, queue: str, name: str = "pixelmill", loglevel: str = "INFO"
) -> int:
    """Start one worker per GPU and supervise them until they all exit.

    SIGTERM/SIGINT are passed on to every worker (Celery's warm shutdown: each finishes its
    current job). If one worker exits on its own, the others are stopped too, so a service
    manager sees the failure and restarts the set. Returns the first non-zero exit status.
    """
    from pixelmill.settings import get_settings
    from worker.metrics_hooks import prepare_metrics_dir, serve_host_metrics, stop_host_metrics

    # One /metrics for the whole host, served from here: this process outlives every worker.
    # It empties the multiprocess directory first and sets PROMETHEUS_MULTIPROC_DIR, which the
    # workers inherit; they serve nothing themselves (PIXELMILL_METRICS_PORT=0).
    settings = get_settings()
    prepare_metrics_dir(settings)
    serve_host_metrics(settings)
    processes: list[subprocess.Popen[bytes]] = start_gpu_workers(
        gpus,
        queue=queue,
        name=name,
        loglevel=loglevel,
        base_env={**os.environ, "PIXELMILL_METRICS_PORT": "0"},
    )
    stopping = False

    def stop_all(signum: int, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while any(process.poll() is None for process in processes):
            if not stopping and any(process.poll() is not None for process in processes):
                stop_all(signal.SIGTERM)
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_host_metrics()
    codes = [process.returncode for process in processes]
    return next((code for code in codes if code), 0)
