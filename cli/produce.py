"""`pixelmill produce`: a catalogue and templates into a run of render jobs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from cli import common
from cli.common import EXIT_PARTIAL, EXIT_REFUSED, console, err, fail
from cli.dispatch import dispatch_once
from pixelmill.errors import BadInputError
from pixelmill.settings import Settings
from producer import bounds

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from producer.report import ProduceReport

CatalogueArgument = Annotated[
    str,
    typer.Argument(
        help="Catalogue: a CSV, JSONL, .xlsx/.xlsm/.ods file (Shopify exports too), "
        "or a database URL."
    ),
]
TemplateOption = Annotated[Path, typer.Option("--template", "-t", help="Template YAML file.")]
# The bounds are the template file's (producer.bounds): one definition serves both.
SeedsOption = Annotated[
    int | None,
    typer.Option(
        min=bounds.SEEDS.low,
        max=bounds.SEEDS.high,
        help="Seeds per job (default: the template's).",
    ),
]
BudgetOption = Annotated[
    int | None,
    typer.Option(
        min=bounds.BUDGET.low,
        max=bounds.BUDGET.high,
        metavar="IMAGES",
        help="The run's images in all, allocated to templates and variants by their keep "
        "rate on earlier runs of this catalogue (instead of --seeds).",
    ),
]
KeepersOption = Annotated[
    int | None,
    typer.Option(
        min=bounds.KEEPERS_PER_ITEM.low,
        max=bounds.KEEPERS_PER_ITEM.high,
        metavar="K",
        help="Seeds enough for K keepers per item at the best keep rate, allocated as "
        "--budget is (instead of --seeds).",
    ),
]
SheetOption = Annotated[
    str | None, typer.Option(help="Sheet, for a spreadsheet (default: the first).")
]
FormatOption = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="csv, jsonl, spreadsheet or shopify (default: by the file's name; a Shopify "
        "export is recognised by its header).",
    ),
]
RunOption = Annotated[str | None, typer.Option(help="Run name (default: file name + time).")]
TableOption = Annotated[str | None, typer.Option(help="Table, for a database catalogue.")]
QueryOption = Annotated[
    str | None, typer.Option(help="Read-only SQL query, for a database catalogue.")
]
EncodingOption = Annotated[str | None, typer.Option(help="Text encoding (e.g. gbk).")]
DelimiterOption = Annotated[str | None, typer.Option(help="CSV delimiter (default: sniffed).")]
StrictOption = Annotated[
    bool, typer.Option(help="Write nothing if any row is bad (default: skip bad rows).")
]
MaxJobsOption = Annotated[
    int,
    typer.Option(
        min=bounds.MAX_JOBS.low,
        max=bounds.MAX_JOBS.high,
        help="Refuse a catalogue that expands to more jobs.",
    ),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Show totals and sample prompts; write nothing.")
]
ForceOption = Annotated[
    bool, typer.Option(help="Render again even what an earlier run already rendered.")
]
PriorityOption = Annotated[
    int | None,
    typer.Option(
        min=bounds.PRIORITY.low,
        max=bounds.PRIORITY.high,
        help="Run priority: higher renders first (new runs: 0; given for an "
        "existing run, it changes the run's priority).",
    ),
]
DispatchOption = Annotated[
    bool, typer.Option("--dispatch/--no-dispatch", help="Publish the new jobs.")
]


def produce(
    catalogue: CatalogueArgument,
    template: TemplateOption,
    seeds: SeedsOption = None,
    budget: BudgetOption = None,
    keepers_per_item: KeepersOption = None,
    run: RunOption = None,
    table: TableOption = None,
    query: QueryOption = None,
    sheet: SheetOption = None,
    format: FormatOption = None,
    encoding: EncodingOption = None,
    delimiter: DelimiterOption = None,
    strict: StrictOption = False,
    max_jobs: MaxJobsOption = 100_000,
    dry_run: DryRunOption = False,
    force: ForceOption = False,
    priority: PriorityOption = None,
    dispatch_jobs: DispatchOption = True,
) -> None:
    """Expand CATALOGUE with the templates into a run of render jobs."""
    settings = common.settings()
    arguments = ProduceArguments(
        catalogue=catalogue,
        template=template,
        seeds=seeds,
        budget=budget,
        keepers_per_item=keepers_per_item,
        run=run,
        table=table,
        query=query,
        sheet=sheet,
        format=format,
        encoding=encoding,
        delimiter=delimiter,
        strict=strict,
        max_jobs=max_jobs,
        dry_run=dry_run,
        force=force,
        priority=priority,
    )
    report = _produce_jobs(settings, arguments)
    if dry_run:
        _print_problems(report.problems, report.problems_total)
        _print_warnings(report)
        _print_dry_run(report, settings.images_per_second)
        # The same exit statuses as a real run, so a dry run can validate a catalogue.
        if not report.complete:
            raise typer.Exit(EXIT_REFUSED if strict else EXIT_PARTIAL)
        return
    print_run(settings, report, dispatch_jobs=dispatch_jobs)
    if not report.complete:
        raise typer.Exit(EXIT_PARTIAL)


@dataclass(frozen=True)
class ProduceArguments:
    """What `produce` was given, as the producer takes it."""

    catalogue: str
    template: Path
    seeds: int | None = None
    budget: int | None = None
    keepers_per_item: int | None = None
    run: str | None = None
    table: str | None = None
    query: str | None = None
    sheet: str | None = None
    format: str | None = None
    encoding: str | None = None
    delimiter: str | None = None
    strict: bool = False
    max_jobs: int = 100_000
    dry_run: bool = False
    force: bool = False
    priority: int | None = None


def run_producer(settings: Settings, arguments: ProduceArguments) -> ProduceReport:
    """The producer's report; raises what the producer raises (nothing is then written)."""
    from pixelmill.blocklist import load_blocklist
    from producer.produce import produce as produce_jobs

    blocklist = load_blocklist(settings.blocklist_path)
    # A dry run writes nothing; with a budget it reads the keep rates of earlier runs.
    needs_session = not arguments.dry_run or (
        arguments.budget is not None or arguments.keepers_per_item is not None
    )
    with (
        _progress("reading catalogue") as progress,
        _maybe_session(settings, needs_session) as session,
    ):
        return produce_jobs(
            session,
            catalogue_path=arguments.catalogue,
            templates_path=arguments.template,
            seeds=arguments.seeds,
            budget=arguments.budget,
            keepers_per_item=arguments.keepers_per_item,
            default_model=settings.model,
            run_name=arguments.run,
            encoding=arguments.encoding,
            delimiter=arguments.delimiter,
            table=arguments.table,
            query=arguments.query,
            sheet=arguments.sheet,
            format=arguments.format,
            strict=arguments.strict,
            max_jobs=arguments.max_jobs,
            dry_run=arguments.dry_run,
            force=arguments.force,
            priority=arguments.priority,
            blocklist=blocklist,
            progress=progress,
            settings=settings,
        )


def _produce_jobs(settings: Settings, arguments: ProduceArguments) -> ProduceReport:
    """The producer's report; a refused produce (all of it: the run is one transaction)
    ends the command with EXIT_REFUSED, its bad rows listed and the reason on one line."""
    from producer.report import NothingToProduceError, StrictModeError

    try:
        return run_producer(settings, arguments)
    except StrictModeError as exc:
        _print_problems(exc.problems, exc.total)
        fail(str(exc), EXIT_REFUSED)
    except NothingToProduceError as exc:
        _print_problems(exc.report.problems, exc.report.problems_total)
        fail(str(exc), EXIT_REFUSED)
    except BadInputError as exc:
        fail(f"{exc}; nothing was written", EXIT_REFUSED)


def print_run(settings: Settings, report: ProduceReport, *, dispatch_jobs: bool) -> None:
    """What a produce wrote (its bad rows and warnings on stderr); publishes the new jobs
    unless ``dispatch_jobs`` is False."""
    _print_problems(report.problems, report.problems_total)
    _print_warnings(report)
    _print_run(report)
    if dispatch_jobs:
        dispatch_once(settings, run_id=report.run_id)


def _print_problems(problems: Sequence[object], total: int) -> None:
    for problem in problems:
        err.print(f"[red]bad row:[/red] {problem}")
    if total > len(problems):
        err.print(f"... and {total - len(problems)} more bad rows")


def _print_warnings(report: ProduceReport) -> None:
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    if report.warnings_total > len(report.warnings):
        err.print(f"... and {report.warnings_total - len(report.warnings)} more warnings")


def _print_budget(report: ProduceReport) -> None:
    budget = report.budget
    if budget is None:
        return
    console.print(
        f"{budget.asked}: {budget.per_item} seeds per item over {len(budget.arms)} template "
        f"variants, by keep rate on earlier runs of {budget.source}"
    )
    for arm in budget.arms:
        name = arm.template if not arm.variant else f"{arm.template} [{arm.variant}]"
        decided = (
            f"{arm.kept} kept of {arm.decided} decided"
            if arm.decided
            else "no decisions yet: the prior's"
        )
        console.print(
            f"  {name}: {arm.seeds} seeds per item, keep rate {arm.keep_rate:.2f} ({decided})",
            markup=False,
            highlight=False,
        )


def _print_run(report: ProduceReport) -> None:
    _print_budget(report)
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
    _print_budget(report)
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
def _maybe_session(settings: Settings, needed: bool) -> Iterator[Session | None]:
    if not needed:
        yield None
        return
    with common.sessions(settings)() as session:
        yield session
