"""`pixelmill status`: a run's jobs by status, images and failures, or a live progress bar."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from cli import common
from cli.common import EXIT_FAILED, console, err, fail
from pixelmill.settings import Settings

if TYPE_CHECKING:
    from db.keeper_costs import CostFigures, RunCosts
    from monitoring.status import ProgressRate, RunStatusReport


def status(
    run: Annotated[str | None, typer.Argument(help="Run name or id.")] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Show a live progress bar (rate, ETA) until done.")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
) -> None:
    """Jobs by status, images made and failures of RUN (default: the latest run)."""
    from db.models import Run as RunRow
    from db.runs import find_run
    from monitoring.status import run_status

    settings = common.settings()
    with common.sessions(settings)() as session:
        found = find_run(session, run)
        if found is None:
            if run:
                fail(f"no run {run!r}")
            err.print("no runs yet")
            raise typer.Exit(EXIT_FAILED)
        run_id = found.id
        if not watch:
            report = run_status(session, found)
    if watch:
        _watch_run(settings, run_id, interval)
        with common.sessions(settings)() as session:
            report = run_status(session, session.get_one(RunRow, run_id))
    print_report(report)


def print_report(report: RunStatusReport) -> None:
    table = Table(title=f"run {report.name!r} (id {report.run_id}, {report.status})")
    table.add_column("job status")
    table.add_column("jobs", justify="right")
    for job_status, count in sorted(report.jobs.items()):
        table.add_row(job_status, str(count))
    console.print(table)
    console.print(f"images: {report.images} of {report.images_planned} planned")
    for job_id, error in report.failures:
        console.print(f"[red]job {job_id} failed:[/red] {error}")
    if report.costs is not None and report.costs.variants:  # nothing to cost before images
        print_costs(report.costs)


def _figure(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _cost_row(table: Table, template: str, variant: str, figures: CostFigures) -> None:
    table.add_row(
        template,
        variant,
        str(figures.images),
        str(figures.kept),
        str(figures.auto_rejected),
        _figure(figures.gpu_seconds_per_image),
        _figure(figures.gpu_seconds_per_keeper),
        _figure(figures.reviewer_seconds_per_keeper),
        _figure(figures.keeper_recall, ".0%"),
        _figure(figures.gpu_seconds_saved, ".1f"),
    )


def print_costs(costs: RunCosts) -> None:
    """GPU- and reviewer-seconds per keeper per template and variant (db.keeper_costs says
    what each figure means)."""
    from db.keeper_costs import REVIEW_GAP_CAP_SECONDS

    # Ten columns in a terminal of 80: light rules, headings on two lines, and names that
    # wrap rather than end in an ellipsis.
    table = Table(
        title="cost per keeper", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    table.add_column("template", overflow="fold", min_width=9)
    table.add_column("variant", overflow="fold", min_width=7)
    headings = ("images", "kept", "auto-\nrej.", "GPU-s/\nimage", "GPU-s/\nkeeper")
    for heading in (*headings, "rev-s/\nkeeper", f"in\ntop {costs.top_k}", "GPU-s\nsaved"):
        table.add_column(heading, justify="right")
    for template, variant in sorted(costs.variants):
        _cost_row(table, template, variant or "–", costs.variants[(template, variant)])
    for template, figures in costs.templates.items():
        if sum(1 for name, _ in costs.variants if name == template) > 1:
            _cost_row(table, template, "(all)", figures)
    _cost_row(table, "(run)", "", costs.total)
    console.print(table)
    total = costs.total
    console.print(
        f"GPU-seconds: {total.gpu_seconds:.1f}, per keeper so far. Review-seconds (rev-s): "
        f"{total.reviewer_seconds:.1f} (gaps between a reviewer's actions, each capped at "
        f"{REVIEW_GAP_CAP_SECONDS / 60:.0f} min). In top {costs.top_k}: kept images the model "
        f"ranked among their item's first {costs.top_k}. Auto-rej.: rejected by the model. "
        f"Early stop: {total.skipped_seeds} seeds skipped, {total.gpu_seconds_saved:.1f} "
        "GPU-seconds saved."
    )


def _watch_run(settings: Settings, run_id: int, interval: float) -> None:
    """A progress bar of the run's images until no job of it is open (monitoring.status)."""
    from monitoring.status import watch_run

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

        watch_run(common.sessions(settings), run_id, interval=interval, show=show)
