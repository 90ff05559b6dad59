"""Every worker serves the finishing queue beside the render queue, and the worker's Celery
app routes the finishing task there."""

from __future__ import annotations

from pathlib import Path

from pixelmill.settings import get_settings
from pixelmill.tasks import FINISH_TASK, RENDER_TASK
from worker.celery_app import celery_config, create_app
from worker.launch import gpu_worker_command, served_queues


def test_workers_serve_both_queues() -> None:
    assert served_queues("render", "finishing") == "render,finishing"
    assert served_queues("gpu", "gpu") == "gpu"  # one queue for both: named once
    command = gpu_worker_command("0", queue=served_queues("render", "finishing"))
    assert "--queues=render,finishing" in command


def test_the_finishing_task_is_routed_to_its_queue(tmp_path: Path) -> None:
    settings = get_settings(data_dir=tmp_path, render_queue="r", finishing_queue="f")
    routes = celery_config(settings)["task_routes"]
    assert routes == {RENDER_TASK: {"queue": "r"}, FINISH_TASK: {"queue": "f"}}
    assert "worker.finishing.tasks" in create_app(settings).conf.include
    import worker.finishing.tasks  # noqa: F401  (what a starting worker imports)
    from worker.main import app

    assert FINISH_TASK in app.tasks
