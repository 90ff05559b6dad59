"""`pixelmill runs` (the latest runs) and `pixelmill run ...` (pause, resume, cancel, priority)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from cli import common
from cli.common import console, fail
from producer import bounds

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import Run

app = typer.Typer(help="Pause, resume, cancel or reprioritise a run.", no_args_is_help=True)

RunArgument = Annotated[str, typer.Argument(help="Run name or id.")]


def runs(limit: Annotated[int, typer.Option(min=1, max=100_000)] = 20) -> None:
    """List the latest runs."""
    from producer.runs import list_runs

    with common.sessions(common.settings())() as session:
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
    """A session and the run ``name``; no such run, or a change the run's state refuses (a
    cancelled run cannot resume), ends the command with exit status 1."""
    from db.runs import find_run
    from producer.runs import RunStateError

    with common.sessions(common.settings())() as session:
        run = find_run(session, name)
        if run is None:
            fail(f"no run {name!r}")
        try:
            yield session, run
        except RunStateError as exc:
            fail(str(exc))


@app.command("pause")
def run_pause(name: RunArgument) -> None:
    """Stop dispatching a run's jobs (running jobs finish; nothing is lost)."""
    from producer.runs import pause_run

    with _run_session(name) as (session, run):
        unqueued = pause_run(session, run)
    console.print(f"run {name!r} paused; {unqueued} queued jobs back to pending")


@app.command("resume")
def run_resume(name: RunArgument) -> None:
    """Dispatch a paused run's jobs again."""
    from producer.runs import resume_run

    with _run_session(name) as (session, run):
        resume_run(session, run)
    console.print(f"run {name!r} resumed")


@app.command("cancel")
def run_cancel(name: RunArgument) -> None:
    """Cancel every job of a run that has not started."""
    from producer.runs import cancel_run

    with _run_session(name) as (session, run):
        cancelled = cancel_run(session, run)
    console.print(f"run {name!r} cancelled; {cancelled} jobs will not render")


@app.command("priority")
def run_priority(
    name: RunArgument,
    priority: Annotated[
        int,
        typer.Argument(
            min=bounds.PRIORITY.low, max=bounds.PRIORITY.high, help="Higher renders first."
        ),
    ],
) -> None:
    """Change a run's priority."""
    from producer.runs import set_priority

    with _run_session(name) as (session, run):
        set_priority(session, run, priority)
    console.print(f"run {name!r} priority {priority}")
