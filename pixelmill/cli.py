"""The ``pixelmill`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pixelmill.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from db.models import Run
    from producer.produce import ProduceReport

app = typer.Typer(
    help="pixelmill: nightly bulk image production with Stable Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
model_app = typer.Typer(help="Models.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")

console = Console(soft_wrap=True)  # paths and URLs stay on one line
err = Console(stderr=True, soft_wrap=True)


def _settings() -> Settings:
    from pydantic import ValidationError

    try:
        settings = get_settings()
    except ValidationError as exc:
        err.print(f"[red]error:[/red] invalid settings: {exc}")
        raise typer.Exit(2) from exc
    from pixelmill.logs import configure_logging

    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def _sessions(settings: Settings) -> sessionmaker[Session]:
    from db.session import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.resolved_database_url))


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from db.migrate import upgrade

    settings = _settings()
    upgrade(settings.resolved_database_url, revision)
    console.print(f"database at {revision}: {_safe_url(settings.resolved_database_url)}")


@db_app.command("check")
def db_check() -> None:
    """Fail if the models and the migrations disagree."""
    from db.migrate import check

    check(_settings().resolved_database_url)
    console.print("models and migrations agree")


@model_app.command("tiny")
def model_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model to.")],
    arch: Annotated[str, typer.Option("--arch", help="Architecture: sd or sdxl.")] = "sd",
) -> None:
    """Write a tiny random Stable Diffusion (or SDXL) pipeline (for tests and the demo)."""
    from worker.tiny_model import ARCHITECTURES, build_tiny

    if arch not in ARCHITECTURES:
        err.print(f"[red]error:[/red] --arch: unknown architecture {arch!r}; known: sd, sdxl")
        raise typer.Exit(2)
    path = build_tiny(out, arch=arch)
    console.print(f"tiny {arch} model written to {path}")


@model_app.command("synthetic")
def model_synthetic(
    arch: Annotated[str, typer.Option("--arch", help="Architecture: sd15 or sdxl.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model to.")],
    dtype: Annotated[str, typer.Option("--dtype", help="Weights: fp16, bf16 or fp32.")] = "fp16",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a full-size SD 1.5 or SDXL pipeline with random weights (for GPU benchmarks)."""
    from worker.synthetic_model import ARCHES, build_synthetic_pipeline, parse_dtype

    known = next((name for name in ARCHES if name == arch), None)
    if known is None:
        err.print(f"[red]error:[/red] --arch: unknown architecture {arch!r}; known: sd15, sdxl")
        raise typer.Exit(2)
    try:
        path = build_synthetic_pipeline(out, arch=known, dtype=parse_dtype(dtype), seed=seed)
    except (ValueError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"synthetic {arch} model written to {path}")


# Exit statuses of `produce`: scripts and schedulers tell the outcomes apart by them.
EXIT_REFUSED = 2  # nothing was written: bad input, --strict with bad rows, --max-jobs exceeded
EXIT_PARTIAL = 3  # the good rows were written, bad rows were skipped (listed on stderr)


@app.command()
def produce(
    catalogue: Annotated[
        str, typer.Argument(help="Catalogue: a CSV or JSONL file, or a database URL.")
    ],
    template: Annotated[Path, typer.Option("--template", "-t", help="Template YAML file.")],
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Seeds per job (default: the template's).")
    ] = None,
    run: Annotated[str | None, typer.Option(help="Run name (default: file name + time).")] = None,
    table: Annotated[str | None, typer.Option(help="Table, for a database catalogue.")] = None,
    query: Annotated[
        str | None, typer.Option(help="Read-only SQL query, for a database catalogue.")
    ] = None,
    encoding: Annotated[str | None, typer.Option(help="Text encoding (e.g. gbk).")] = None,
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter (default: sniffed).")] = None,
    strict: Annotated[
        bool, typer.Option(help="Write nothing if any row is bad (default: skip bad rows).")
    ] = False,
    max_jobs: Annotated[
        int, typer.Option(min=1, help="Refuse a catalogue that expands to more jobs.")
    ] = 100_000,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show totals and sample prompts; write nothing.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Render again even what an earlier run already rendered.")
    ] = False,
    priority: Annotated[
        int | None,
        typer.Option(
            help="Run priority: higher renders first (new runs: 0; given for an "
            "existing run, it changes the run's priority)."
        ),
    ] = None,
    dispatch_jobs: Annotated[
        bool, typer.Option("--dispatch/--no-dispatch", help="Publish the new jobs.")
    ] = True,
) -> None:
    """Expand CATALOGUE with the templates into a run of render jobs."""
    from pixelmill.blocklist import load_blocklist
    from pixelmill.errors import InputError
    from producer.produce import StrictModeError
    from producer.produce import produce as produce_jobs

    settings = _settings()
    blocklist = load_blocklist(settings.blocklist_path)
    try:
        with (
            _progress("reading catalogue") as progress,
            _maybe_session(settings, dry_run) as session,
        ):
            report = produce_jobs(
                session,
                catalogue_path=catalogue,
                templates_path=template,
                seeds=seeds,
                default_model=settings.model,
                run_name=run,
                encoding=encoding,
                delimiter=delimiter,
                table=table,
                query=query,
                strict=strict,
                max_jobs=max_jobs,
                dry_run=dry_run,
                force=force,
                priority=priority,
                blocklist=blocklist,
                progress=progress,
                settings=settings,
            )
    except StrictModeError as exc:
        _print_problems(exc.problems, exc.total)
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_REFUSED) from exc
    except InputError as exc:
        err.print(f"[red]error:[/red] {exc}")
        err.print("nothing was written")
        raise typer.Exit(EXIT_REFUSED) from exc
    _print_problems(report.problems, report.problems_total)
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    if report.warnings_total > len(report.warnings):
        err.print(f"... and {report.warnings_total - len(report.warnings)} more warnings")
    if dry_run:
        _print_dry_run(report, settings.images_per_second)
        # The same exit statuses as a real run, so a dry run can validate a catalogue.
        if not report.complete:
            raise typer.Exit(EXIT_REFUSED if strict else EXIT_PARTIAL)
        return
    console.print(
        f"run {report.run_name!r} (id {report.run_id}): {report.rows} rows, "
        f"{report.items} items, {report.rows_skipped} rows skipped; "
        f"{report.jobs_new} new jobs, {report.jobs_unchanged} unchanged, "
        f"{report.images_planned} images planned"
    )
    if report.inputs:
        console.print(
            f"catalogue images: {report.inputs} distinct, {report.inputs_fetched} fetched, "
            f"{report.inputs_reused} staged by an earlier run, {report.inputs_failed} failed"
        )
    if dispatch_jobs:
        _dispatch(settings, run_id=report.run_id)
    if not report.complete:
        raise typer.Exit(EXIT_PARTIAL)


def _print_problems(problems: Sequence[object], total: int) -> None:
    for problem in problems:
        err.print(f"[red]bad row:[/red] {problem}")
    if total > len(problems):
        err.print(f"... and {total - len(problems)} more bad rows")


def _print_dry_run(report: ProduceReport, images_per_second: float) -> None:
    gpu_seconds = report.images_planned / images_per_second
    console.print(
        f"dry run (nothing written): {report.rows} rows, {report.items} items, "
        f"{report.rows_skipped} rows skipped, {report.jobs} jobs, "
        f"{report.images_planned} images, about {timedelta(seconds=round(gpu_seconds))} "
        f"of GPU time at {images_per_second:g} images/s"
    )
    if report.inputs:
        console.print(
            f"catalogue images: {report.inputs} distinct, not fetched on a dry run "
            "(unreachable or broken images show only in a real run)"
        )
    for name, prompts in report.samples.items():
        console.print(f"[bold]{name}[/bold]")
        for prompt in prompts:
            console.print(f"  {prompt}")


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal; nothing (quiet logs) otherwise."""
    if not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(label),
        TextColumn("{task.fields[rows]:,} rows"),
        TextColumn("{task.fields[jobs]:,} jobs"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, rows=0, jobs=0)
        yield lambda rows, jobs: bar.update(task, rows=rows, jobs=jobs)


@contextmanager
def _maybe_session(settings: Settings, dry_run: bool) -> Iterator[Session | None]:
    if dry_run:
        yield None
        return
    with _sessions(settings)() as session:
        yield session


def _dispatch(settings: Settings, run_id: int | None = None, *, quiet: bool = False) -> None:
    from producer.dispatch import celery_publisher
    from producer.dispatch import dispatch as dispatch_jobs
    from worker.celery_app import create_app
    from worker.claim import reap_expired

    celery = create_app(settings)
    with _sessions(settings)() as session:
        # Jobs whose worker died (lease expired) go back to pending, or dead after
        # max_attempts (cancelled in a cancelled run), before the window is topped up.
        reaped = reap_expired(session, max_attempts=settings.max_attempts)
        if reaped.requeued or reaped.dead or reaped.cancelled:
            err.print(
                f"re-queued {len(reaped.requeued)} jobs whose worker stopped; "
                f"{len(reaped.dead)} out of attempts are dead; "
                f"{len(reaped.cancelled)} of cancelled runs are cancelled"
            )
        report = dispatch_jobs(
            session,
            celery_publisher(celery, settings.render_queue),
            requeue_after=timedelta(seconds=settings.requeue_after_seconds),
            run_id=run_id,
            window=settings.dispatch_window,
        )
    if not quiet:
        console.print(f"published {report.published} jobs, re-published {report.republished}")


@app.command()
def dispatch(
    watch: Annotated[
        float | None, typer.Option(help="Keep dispatching every WATCH seconds.")
    ] = None,
) -> None:
    """Publish pending jobs (and re-publish queued jobs whose message was lost)."""
    settings = _settings()
    if watch is not None and settings.dispatch_metrics_port:
        # A long-running dispatcher serves its counters (PIXELMILL_DISPATCH_METRICS_PORT).
        from monitoring.server import start_metrics_server

        start_metrics_server(settings.dispatch_metrics_port)
    while True:
        _dispatch(settings)
        if watch is None:
            return
        time.sleep(watch)


@app.command()
def worker(
    gpus: Annotated[
        str | None, typer.Option(help="Start one worker process per GPU, e.g. 0,1,2,3.")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Processes of a single worker (without --gpus).")
    ] = 1,
    name: Annotated[str, typer.Option(help="Celery node name.")] = "pixelmill@%h",
    loglevel: str = "INFO",
) -> None:
    """Run render workers (one per GPU with --gpus; else the same as `celery -A worker
    worker`). The model is loaded in each worker process, never in this one."""
    from worker.launch import parse_gpus, run_gpu_workers, worker_argv

    settings = _settings()
    if gpus is not None:
        try:
            gpu_list = parse_gpus(gpus)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--gpus") from exc
        raise typer.Exit(
            run_gpu_workers(
                gpu_list, queue=settings.render_queue, name=name.split("@")[0], loglevel=loglevel
            )
        )
    from worker import app as celery

    celery.worker_main(
        worker_argv(
            queue=settings.render_queue, hostname=name, concurrency=concurrency, loglevel=loglevel
        )
    )


@app.command()
def status(
    run: Annotated[str | None, typer.Argument(help="Run name or id.")] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Show a live progress bar (rate, ETA) until done.")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
) -> None:
    """Jobs by status, images made and failures of RUN (default: the latest run)."""
    from pixelmill.status import find_run, run_status

    settings = _settings()
    with _sessions(settings)() as session:
        found = find_run(session, run)
        if found is None:
            err.print(f"[red]error:[/red] no run {run!r}" if run else "no runs yet")
            raise typer.Exit(1)
        run_id = found.id
        if not watch:
            report = run_status(session, found)
    if watch:
        from db.models import Run as RunRow

        _watch_run(settings, run_id, interval)
        with _sessions(settings)() as session:
            report = run_status(session, session.get_one(RunRow, run_id))
    table = Table(title=f"run {report.name!r} (id {report.run_id}, {report.status})")
    table.add_column("job status")
    table.add_column("jobs", justify="right")
    for job_status, count in sorted(report.jobs.items()):
        table.add_row(job_status, str(count))
    console.print(table)
    console.print(f"images: {report.images} of {report.images_planned} planned")
    for job_id, error in report.failures:
        console.print(f"[red]job {job_id} failed:[/red] {error}")


def _watch_run(settings: Settings, run_id: int, interval: float) -> None:
    """A progress bar of the run's images until no job of it is open (pixelmill.status)."""
    from pixelmill.status import ProgressRate, RunStatusReport, watch_run

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images  {task.fields[rate]}  {task.fields[eta]}  {task.fields[jobs]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("run", total=None, rate="", eta="", jobs="")

        def show(report: RunStatusReport, rate: ProgressRate) -> None:
            per_second = rate.per_second()
            eta = rate.eta_seconds(report.images_planned - report.images)
            eta_text = "ETA ?" if eta is None else f"ETA {timedelta(seconds=round(eta))}"
            open_jobs = {s: n for s, n in sorted(report.jobs.items()) if n}
            progress.update(
                task,
                description=f"run {report.name!r}",
                total=max(report.images_planned, report.images),
                completed=report.images,
                rate="…" if per_second is None else f"{per_second * 60:.1f}/min",
                eta="done" if report.finished else eta_text,
                jobs=" ".join(f"{s}:{n}" for s, n in open_jobs.items()),
            )

        watch_run(_sessions(settings), run_id, interval=interval, show=show)


run_app = typer.Typer(help="Pause, resume, cancel or reprioritise a run.", no_args_is_help=True)
app.add_typer(run_app, name="run")


@app.command()
def runs(limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """List the latest runs."""
    from producer.runs import list_runs

    with _sessions(_settings())() as session:
        summaries = list_runs(session, limit=limit)
    # Plain aligned columns (like `docker ps`): readable in a terminal, greppable in a log.
    header = ("ID", "NAME", "STATUS", "PRIORITY", "CREATED", "JOBS", "DONE", "FAILED", "IMAGES")
    rows = [
        (
            str(r.id),
            r.name,
            r.status,
            str(r.priority),
            r.created_at,
            str(r.jobs),
            str(r.jobs_done),
            str(r.jobs_failed),
            str(r.images),
        )
        for r in summaries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        console.print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(),
            markup=False,
            highlight=False,
        )


@contextmanager
def _run_session(name: str) -> Iterator[tuple[Session, Run]]:
    from pixelmill.status import find_run
    from producer.runs import RunStateError

    with _sessions(_settings())() as session:
        run = find_run(session, name)
        if run is None:
            err.print(f"[red]error:[/red] no run {name!r}")
            raise typer.Exit(1)
        try:
            yield session, run
        except RunStateError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc


@run_app.command("pause")
def run_pause(name: Annotated[str, typer.Argument(help="Run name or id.")]) -> None:
    """Stop dispatching a run's jobs (running jobs finish; nothing is lost)."""
    from producer.runs import pause_run

    with _run_session(name) as (session, run):
        unqueued = pause_run(session, run)
    console.print(f"run {name!r} paused; {unqueued} queued jobs back to pending")


@run_app.command("resume")
def run_resume(name: Annotated[str, typer.Argument(help="Run name or id.")]) -> None:
    """Dispatch a paused run's jobs again."""
    from producer.runs import resume_run

    with _run_session(name) as (session, run):
        resume_run(session, run)
    console.print(f"run {name!r} resumed")


@run_app.command("cancel")
def run_cancel(name: Annotated[str, typer.Argument(help="Run name or id.")]) -> None:
    """Cancel every job of a run that has not started."""
    from producer.runs import cancel_run

    with _run_session(name) as (session, run):
        cancelled = cancel_run(session, run)
    console.print(f"run {name!r} cancelled; {cancelled} jobs will not render")


@run_app.command("priority")
def run_priority(
    name: Annotated[str, typer.Argument(help="Run name or id.")],
    priority: Annotated[int, typer.Argument(help="Higher renders first.")],
) -> None:
    """Change a run's priority."""
    from producer.runs import set_priority

    with _run_session(name) as (session, run):
        set_priority(session, run, priority)
    console.print(f"run {name!r} priority {priority}")


@app.command()
def demo(
    examples: Annotated[Path, typer.Option(help="Folder with catalogue.csv, templates.yaml.")] = (
        Path("examples")
    ),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the render.")] = 600,
) -> None:
    """Run the nightly job end to end on the embedded defaults (SQLite, local folder, a Celery
    worker on a file-based transport, the tiny model)."""
    from db.migrate import upgrade
    from pixelmill.status import find_run, run_status
    from worker.launch import worker_argv
    from worker.models import resolve_model

    settings = _settings()
    upgrade(settings.resolved_database_url)
    console.print(f"model: {resolve_model(settings.model, settings)}")
    run_name = default_demo_run()
    produce(str(examples / "catalogue.csv"), template=examples / "templates.yaml", run=run_name)
    worker_process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            *worker_argv(queue=settings.render_queue, hostname="demo@%h", loglevel="WARNING"),
        ],
        env=os.environ.copy(),
    )
    sessions = _sessions(settings)
    try:
        deadline = time.monotonic() + timeout
        with Progress(
            TextColumn("rendering"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("images", total=None)
            while True:
                with sessions() as session:
                    found = find_run(session, run_name)
                    assert found is not None
                    report = run_status(session, found)
                progress.update(task, total=report.images_planned, completed=report.images)
                if report.finished:
                    break
                # The dispatcher keeps a small window on the broker: top it up as jobs finish.
                _dispatch(settings, quiet=True)
                if worker_process.poll() is not None:
                    err.print(f"[red]error:[/red] the worker exited ({worker_process.returncode})")
                    raise typer.Exit(1)
                if time.monotonic() > deadline:
                    err.print(f"[red]error:[/red] not finished after {timeout:.0f} s")
                    raise typer.Exit(1)
                time.sleep(0.5)
    finally:
        worker_process.send_signal(signal.SIGTERM)
        worker_process.wait(timeout=60)
    status(run_name)
    if report.failures:
        raise typer.Exit(1)
    storage = (
        f"s3://{settings.s3_bucket}/{settings.s3_prefix}"
        if settings.storage == "s3"
        else str(settings.resolved_storage_dir)
    )
    console.print(f"images:   {storage}")
    console.print(f"database: {_safe_url(settings.resolved_database_url)}")


def default_demo_run() -> str:
    from datetime import UTC, datetime

    return f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# Subcommands owned by other parts of the system. Each part keeps its commands in its own
# module with a `register(app)` function and imports its heavy dependencies inside the
# commands, so `pixelmill --help` stays fast.
# --- review app (review/cli.py) ---
from review.cli import register as _register_review  # noqa: E402

_register_review(app)
# --- monitoring (monitoring/cli.py) ---
from monitoring.cli import register as _register_monitoring  # noqa: E402

_register_monitoring(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
