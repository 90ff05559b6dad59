"""A small real run for the monitoring tests: catalogue -> jobs -> broker -> a worker."""

from __future__ import annotations

import urllib.request
from datetime import timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from db.models import Job, JobStatus
from pixelmill.settings import Settings
from producer.dispatch import celery_publisher, dispatch
from producer.produce import produce
from worker.celery_app import create_app

CATALOGUE = "sku,title,colour\n" + "".join(f"S-{i},item {i},colour {i}\n" for i in range(1, 9))

TEMPLATES = """key: sku
defaults:
  steps: 2
  width: 64
  height: 64
templates:
  studio:
    prompt: "product photo of a {{ colour }} {{ title }}"
"""


def produce_run(
    tmp_path: Path, engine: Engine, settings: Settings, *, items: int, seeds: int, name: str
) -> int:
    """Produce ``items`` jobs of ``seeds`` images each into run ``name``; returns the run id."""
    lines = CATALOGUE.splitlines()
    catalogue = tmp_path / f"{name}.csv"
    catalogue.write_text("\n".join(lines[: items + 1]) + "\n")
    templates = tmp_path / "templates.yaml"
    templates.write_text(TEMPLATES)
    with Session(engine) as session:
        report = produce(
            session,
            catalogue_path=catalogue,
            templates_path=templates,
            seeds=seeds,
            default_model=settings.model,
            run_name=name,
        )
    assert report.jobs_new == items
    return report.run_id


def dispatch_all(engine: Engine, settings: Settings) -> int:
    with Session(engine) as session:
        return dispatch(
            session,
            celery_publisher(create_app(settings), settings.render_queue),
            requeue_after=timedelta(minutes=10),
        ).published


def open_jobs(engine: Engine) -> int:
    with Session(engine) as session:
        open_states = [JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING]
        return (
            session.scalar(select(func.count()).select_from(Job).where(Job.status.in_(open_states)))
            or 0
        )


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    parsed: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]
