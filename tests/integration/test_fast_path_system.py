"""The fast path and the few-step samplings through the whole slice: templates naming them on
the tiny SD model -> jobs in Postgres -> dispatcher -> broker (Redis and RabbitMQ) -> a
Celery worker process -> PNGs in S3 (moto server) -> image rows, each PNG recording what ran.

torch.compile is left to the CPU tests of worker.fast_path: a cold compile of the tiny model
takes minutes on this machine, and the worker compiles only on CUDA by default."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.models import Image, Job, JobStatus, Run
from pixelmill.settings import get_settings
from pixelmill.storage import storage_from_settings
from producer.dispatch import celery_publisher, dispatch
from producer.produce import produce
from tests.conftest import WorkerProcess, no_open_jobs, settings_env, wait_for
from worker.celery_app import create_app
from worker.png import read_pixelmill

pytestmark = pytest.mark.integration

CATALOGUE = "sku,title\nA-1,canvas sneaker\n"

# `plain` takes the settings' fast path (channels_last and fused QKV, on by default). Two more
# runs render the same template name (so the same seeds): one with both turned off, produced
# with --force (the exact options are not in the dedupe key), which must agree within the
# fast path's stated tolerance of one 8-bit level; one with DeepCache, which need not.
TEMPLATES = """key: sku
defaults:
  steps: 4
  width: 64
  height: 64
  guidance: 7
  scheduler: ddim
templates:
  plain:
    prompt: "product photo of a {{ title }}, white background"
  lcm:
    prompt: "product photo of a {{ title }}, white background"
    sampling: lcm
  tcd:
    prompt: "product photo of a {{ title }}, white background"
    sampling: {method: tcd, eta: 0.3}
  turbo:
    prompt: "product photo of a {{ title }}, white background"
    sampling: turbo
    steps: 1
"""
PLAIN = TEMPLATES[: TEMPLATES.index("  lcm:")]
EXACT_OFF = PLAIN + "    fast_path: {channels_last: false, fuse_qkv: false}\n"
DEEPCACHE = PLAIN + "    fast_path: {deepcache: 2}\n"
# (run, its templates, --force): the later runs render template `plain`'s seeds again.
RUNS = (("fast", TEMPLATES, False), ("exact_off", EXACT_OFF, True), ("deepcache", DEEPCACHE, False))


def test_fast_path_options_and_few_step_samplings_render_through_the_broker_into_s3(
    tmp_path: Path,
    tiny_model_dir: Path,
    fresh_database_url: str,
    broker_url: str,
    render_queue: str,
    s3_settings: dict[str, str],
    start_worker: Callable[[dict[str, str], str], WorkerProcess],
) -> None:
    values: dict[str, str | Path] = {
        "database_url": fresh_database_url,
        "broker_url": broker_url,
        "render_queue": render_queue,
        "model": str(tiny_model_dir),
        "device": "cpu",
        "data_dir": tmp_path / "data",
        **s3_settings,
    }
    settings = get_settings(**values)
    (tmp_path / "catalogue.csv").write_text(CATALOGUE)
    engine = create_engine(fresh_database_url)
    for run, templates, force in RUNS:
        (tmp_path / f"{run}.yaml").write_text(templates)
        with Session(engine) as session:
            report = produce(
                session,
                catalogue_path=tmp_path / "catalogue.csv",
                templates_path=tmp_path / f"{run}.yaml",
                seeds=2,
                default_model=settings.model,
                run_name=run,
                force=force,
            )
        assert report.jobs_new == (4 if run == "fast" else 1)

    worker = start_worker(settings_env(values), render_queue)
    with Session(engine) as session:
        dispatch(
            session,
            celery_publisher(create_app(settings), render_queue),
            requeue_after=timedelta(minutes=10),
        )
    wait_for(no_open_jobs(engine), timeout=240, what="every job to end", worker=worker)
    with Session(engine) as session:
        stored = stored_images(session, s3_settings)
    engine.dispose()
    check_records(stored)
    check_pixels(stored)


def stored_images(
    session: Session, s3_settings: dict[str, str]
) -> dict[tuple[str, int], tuple[dict[str, Any], np.ndarray]]:
    """(template, seed) -> (the PNG's pixelmill chunk, its pixels), read back from S3; every
    job done and every seed stored once, its bytes those the row's sha256 names."""
    storage = storage_from_settings(get_settings(**s3_settings))
    jobs = session.scalars(select(Job).order_by(Job.id)).all()
    runs = {run.id: run.name for run in session.scalars(select(Run))}
    assert [(job.template, job.status, job.error) for job in jobs] == [
        (job.template, JobStatus.DONE, None) for job in jobs
    ]
    stored = {}
    for job in jobs:
        images = session.scalars(select(Image).where(Image.job_id == job.id)).all()
        assert sorted(image.seed for image in images) == sorted(job.seeds)
        for image in images:
            data = storage.get(image.storage_key)
            assert hashlib.sha256(data).hexdigest() == image.sha256
            chunk = read_pixelmill(data)
            assert chunk is not None
            pixels = np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
            run = runs[job.run_id]
            label = job.template if run == "fast" else run
            stored[(label, image.seed)] = (chunk, pixels)
    return stored


def check_records(stored: dict[tuple[str, int], tuple[dict[str, Any], np.ndarray]]) -> None:
    """Each image's chunk says what ran: the fast path's options, whether it is approximate,
    the few-step method, and whether an unconditional pass ran."""
    for (template, _), (chunk, _) in stored.items():
        fast = chunk["fast_path"]
        expected_exact = template != "exact_off"
        assert (fast["channels_last"], fast["fuse_qkv"]) == (expected_exact, expected_exact)
        assert fast["compile"] == "off"  # CPU: compile is on for CUDA workers only
        assert fast["deepcache_interval"] == (2 if template == "deepcache" else None)
        assert chunk["approximate"] is (template == "deepcache")
        method = chunk.get("sampling", {}).get("method")
        assert method == (template if template in ("lcm", "tcd", "turbo") else None)
        # Few-step samplings run at guidance <= 1: the denoiser once per step.
        assert chunk["classifier_free_guidance"] is (method is None)
    assert stored[("tcd", next(s for t, s in stored if t == "tcd"))][0]["sampling"]["eta"] == 0.3


def check_pixels(stored: dict[tuple[str, int], tuple[dict[str, Any], np.ndarray]]) -> None:
    """The default fast path renders what the plain one does within one 8-bit level, through
    the whole system; DeepCache (approximate) does not."""
    seeds = sorted(seed for template, seed in stored if template == "plain")
    assert len(seeds) == 2
    for seed in seeds:
        fast, plain = stored[("plain", seed)][1], stored[("exact_off", seed)][1]
        assert int(np.abs(fast - plain).max()) <= 1
        assert int(np.abs(stored[("deepcache", seed)][1] - plain).max()) > 1
