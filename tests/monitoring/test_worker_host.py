"""A worker host's /metrics under Celery's prefork pool: one endpoint for every pool process,
counters that add up across processes (including recycled ones), no stale counts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import Image, Job
from pixelmill.settings import get_settings
from tests.conftest import free_port, settings_env, wait_for
from tests.monitoring.conftest import HostProcess, promtool_check_metrics
from tests.monitoring.runs import dispatch_all, open_jobs, produce_run, samples, scrape, value

pytestmark = pytest.mark.integration


def _stale_counter(multiproc_dir: Path) -> None:
    """What a previous start of the host left behind: 1000 jobs done by a long-gone process."""
    code = "from worker.metrics import JOBS_FINISHED; JOBS_FINISHED.labels('done').inc(1000)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def _done_per_file(multiproc_dir: Path) -> dict[str, float]:
    """pixelmill_jobs_finished_total{outcome="done"} as each process's own file holds it."""
    per_file = {}
    for path in sorted(multiproc_dir.glob("counter_*.db")):
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == "pixelmill_jobs_finished_total" and sample.labels == {
                    "outcome": "done"
                }:
                    per_file[path.name] = sample.value
    return per_file


def test_prefork_processes_add_up(
    tmp_path: Path,
    fresh_database_url: str,
    engine: Engine,
    broker_url: str,
    render_queue: str,
    tiny_model_dir: Path,
    promtool: str,
    start_pixelmill: Callable[[list[str], dict[str, str]], HostProcess],
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    values: dict[str, str | Path] = {
        "database_url": fresh_database_url,
        "broker_url": broker_url,
        "render_queue": render_queue,
        "model": str(tiny_model_dir),
        "device": "cpu",
        "data_dir": data_dir,
        "storage_dir": tmp_path / "images",
        "metrics_port": str(port),
        # Every pool process is replaced after two jobs: the counts of exited processes stay.
        "worker_max_tasks_per_child": "2",
    }
    settings = get_settings(**values)
    multiproc_dir = settings.resolved_prometheus_multiproc_dir  # the default, under data_dir
    multiproc_dir.mkdir(parents=True)
    _stale_counter(multiproc_dir)
    produce_run(tmp_path, engine, settings, items=4, seeds=1, name="prefork")

    env = settings_env(values)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    host = start_pixelmill(["worker", "--concurrency", "2", "--name", "prefork@%h"], env)
    url = f"http://127.0.0.1:{port}/metrics"

    def serving() -> bool:
        try:
            return "pixelmill_jobs_finished_total" in scrape(url)
        except OSError:
            return False

    wait_for(serving, timeout=120, what="the worker host's /metrics", worker=host)
    assert dispatch_all(engine, settings) == 4
    wait_for(lambda: open_jobs(engine) == 0, timeout=240, what="every job to end", worker=host)

    text = scrape(url)
    promtool_check_metrics(promtool, text)
    parsed = samples(text)
    with Session(engine) as session:
        done_jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.status == "done")
        )
        images = session.scalar(select(func.count()).select_from(Image))
        workers = set(session.scalars(select(Job.worker)))
    assert (done_jobs, images) == (4, 4)
    assert len(workers) >= 2, workers  # several pool processes rendered (recycled every 2 jobs)

    # The endpoint's figure is the sum of the processes' own files, and matches the database:
    # the stale 1000 from before the host started was cleaned away.
    per_file = _done_per_file(multiproc_dir)
    assert len([v for v in per_file.values() if v > 0]) >= 2, per_file
    assert sum(per_file.values()) == value(parsed, "pixelmill_jobs_finished_total", outcome="done")
    assert value(parsed, "pixelmill_jobs_finished_total", outcome="done") == done_jobs
    assert value(parsed, "pixelmill_job_duration_seconds_count") == done_jobs
    assert value(parsed, "pixelmill_jobs_finished_total", outcome="failed") == 0
    assert host.process.poll() is None, host.output()
