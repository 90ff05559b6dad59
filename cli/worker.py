"""`pixelmill worker`: render workers, one process per GPU or one Celery worker."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import common


def worker(
    gpus: Annotated[
        str | None, typer.Option(help="Start one worker process per GPU, e.g. 0,1,2,3.")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=256, help="Processes of a single worker (without --gpus).")
    ] = 1,
    name: Annotated[str, typer.Option(help="Celery node name.")] = "pixelmill@%h",
    loglevel: str = "INFO",
) -> None:
    """Run render workers (one per GPU with --gpus; else the same as `celery -A worker.main
    worker`). They also serve the finishing queue (upscaling and captioning keepers). The
    model is loaded in each worker process, never in this one."""
    from worker.launch import parse_gpus, run_gpu_workers, served_queues, worker_argv

    settings = common.settings()
    queues = served_queues(settings.render_queue, settings.finishing_queue)
    if gpus is not None:
        try:
            gpu_list = parse_gpus(gpus)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--gpus") from exc
        raise typer.Exit(
            run_gpu_workers(gpu_list, queue=queues, name=name.split("@")[0], loglevel=loglevel)
        )
    from worker.main import app as celery

    celery.worker_main(
        worker_argv(queue=queues, hostname=name, concurrency=concurrency, loglevel=loglevel)
    )
