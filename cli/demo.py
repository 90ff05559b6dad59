"""`pixelmill demo`: the nightly job end to end on the embedded defaults."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import common
from cli.common import EXIT_FAILED, console, fail
from cli.demo_finish import (
    export_channels_checked,
    finish_and_export,
    finishing_models_checked,
    tiny_finishing,
    wait_with_bar,
)
from cli.dispatch import dispatch_once
from cli.produce import ProduceArguments, print_run, run_producer
from cli.status import status
from pixelmill.errors import BadInputError
from pixelmill.settings import Settings

if TYPE_CHECKING:
    from monitoring.status import RunStatusReport


def demo(
    examples: Annotated[Path, typer.Option(help="Folder with catalogue.csv, templates.yaml.")] = (
        Path("examples")
    ),
    timeout: Annotated[
        float, typer.Option(min=1, max=86_400, help="Seconds to wait for the render.")
    ] = 600,
) -> None:
    """Run the nightly job end to end on the embedded defaults (SQLite, local folder, a Celery
    worker on a file-based transport, the tiny model): render, keep each item's top-ranked
    image as the reviewer 'demo', finish the keepers (tiny upscaler and captioner) and export
    them for the sales channels under the data folder."""
    _quiet_libraries()
    from db.migrate import upgrade
    from worker.models import resolve_model

    catalogue, templates = _example_files(examples)
    # The presets, any signing credentials and the finishing models, checked before anything
    # is written.
    loaded = common.load_settings()
    channels = export_channels_checked(loaded)
    finishing_models_checked(loaded)
    settings = tiny_finishing(common.settings())
    # A fresh database's migrations, one log line each, are not what the demo is about.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    upgrade(settings.resolved_database_url)
    console.print(f"model: {resolve_model(settings.model, settings)}")
    run_name = default_demo_run(examples, catalogue, templates)
    _produce_demo_run(settings, catalogue, templates, run_name)
    worker_process = _start_worker(settings)

    def check_worker() -> None:
        _check_worker(settings, worker_process)

    try:
        report = _wait_for_render(settings, run_name, check_worker, timeout)
        # Keepers are finished on the worker's finishing queue: it stays up until then.
        if not report.failures:
            finish_and_export(
                settings, run_name, channels, check_worker, timeout, worker_log(settings)
            )
    finally:
        worker_process.send_signal(signal.SIGTERM)
        worker_process.wait(timeout=60)
    status(run_name)
    if report.failures:
        raise typer.Exit(EXIT_FAILED)
    storage = (
        f"s3://{settings.s3_bucket}/{settings.s3_prefix}"
        if settings.storage == "s3"
        else str(settings.resolved_storage_dir)
    )
    console.print(f"images:   {storage}")
    console.print(f"database: {common.safe_url(settings.resolved_database_url)}")
    console.print(f"worker log: {worker_log(settings)}")


def _example_files(examples: Path) -> tuple[Path, Path]:
    """The folder's catalogue.csv and templates.yaml; refused (exit 2) before anything
    starts when either is missing."""
    if not examples.is_dir():
        raise BadInputError(f"--examples {str(examples)!r}: no such folder")
    files = examples / "catalogue.csv", examples / "templates.yaml"
    for path in files:
        if not path.is_file():
            raise BadInputError(f"--examples {str(examples)!r}: {path.name} is missing")
    return files


def default_demo_run(examples: Path, catalogue: Path, templates: Path) -> str:
    """The demo run's name: its examples folder, catalogue and template file, then the time,
    so two demo runs (of examples/ and of examples/product-scenes/, say) can be told apart."""
    from datetime import UTC, datetime

    folder = examples.resolve().name or "examples"
    return f"{folder}-{catalogue.stem}-{templates.stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def _produce_demo_run(settings: Settings, catalogue: Path, templates: Path, run_name: str) -> None:
    """Produces the demo's run and publishes its jobs. An earlier demo on the same database
    made every job already, and the demo is there to show a render: it renders them again."""
    from producer.report import NothingToProduceError

    arguments = ProduceArguments(catalogue=str(catalogue), template=templates, run=run_name)
    try:
        report = run_producer(settings, arguments)
    except NothingToProduceError:
        console.print("an earlier demo made these jobs already: rendering them again (--force)")
        report = run_producer(settings, replace(arguments, force=True))
    print_run(settings, report, dispatch_jobs=True)


def _quiet_libraries() -> None:
    """No notices or progress bars from transformers and diffusers (building the tiny model
    and scorer, loading them), here and in the worker, which inherits the environment: the
    demo's output is its own. Set before either library is imported; a variable already set
    is left as it is."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """One Celery worker process on the render and finishing queues, as `pixelmill worker`
    starts them, with this process's environment; it
    scores with the built-in tiny scorer unless a scorer is configured (PIXELMILL_SCORER set,
    even empty), so a first run's review grid is ranked."""
    from worker.launch import CELERY_APP, served_queues, worker_argv

    env = os.environ.copy()
    if not settings.scorer and "PIXELMILL_SCORER" not in env:
        env["PIXELMILL_SCORER"] = "tiny"
    # The worker's banner and logs go to a file: what a newcomer sees is progress and results.
    log = worker_log(settings).open("ab")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                CELERY_APP,
                *worker_argv(
                    queue=served_queues(settings.render_queue, settings.finishing_queue),
                    hostname="demo@%h",
                    loglevel="WARNING",
                ),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()  # the child holds its own copy


def worker_log(settings: Settings) -> Path:
    return (settings.data_dir / "demo-worker.log").resolve()


def _check_worker(settings: Settings, worker_process: subprocess.Popen[bytes]) -> None:
    """The worker having exited ends the command with exit status 1."""
    if worker_process.poll() is not None:
        fail(f"the worker exited ({worker_process.returncode}); its log: {worker_log(settings)}")


def _wait_for_render(
    settings: Settings, run_name: str, check_worker: Callable[[], None], timeout: float
) -> RunStatusReport:
    """A progress bar of run ``run_name`` until it is finished; the worker exiting
    (``check_worker``), or the run not finishing within ``timeout`` seconds, ends the
    command with exit status 1."""
    from db.runs import find_run
    from monitoring.status import run_status

    sessions = common.sessions(settings)
    latest: list[RunStatusReport] = []  # the last poll's report, what the demo prints

    def poll() -> tuple[int, int | None, bool]:
        with sessions() as session:
            found = find_run(session, run_name)
            assert found is not None
            latest[:] = [run_status(session, found)]
        return latest[0].images, latest[0].images_planned, latest[0].finished

    def between() -> None:
        # The dispatcher keeps a small window on the broker: top it up as jobs finish.
        dispatch_once(settings, quiet=True)
        check_worker()

    wait_with_bar(
        "rendering",
        poll,
        between=between,
        timeout=timeout,
        timed_out=f"not finished after {timeout:.0f} s",
    )
    return latest[0]
