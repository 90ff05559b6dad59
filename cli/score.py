"""`pixelmill score RUN`: (re)score a run's images with the configured scorer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli import common
from cli.common import EXIT_BAD_INPUT, console, err, fail


def score(run: Annotated[str, typer.Argument(help="Run name or id.")]) -> None:
    """Score every stored image of RUN not yet scored by the configured scorer
    (PIXELMILL_SCORER), in batches: resumable, and a no-op when run again."""
    from db.runs import find_run
    from pixelmill.storage import storage_from_settings
    from worker.scoring.configured import scorer_from_settings
    from worker.scoring.rescore import rescore_run

    settings = common.settings()
    scorer = scorer_from_settings(settings)
    if scorer is None:
        fail("no scorer configured: set PIXELMILL_SCORER (a CLIP folder, hub id or 'tiny')",
             EXIT_BAD_INPUT)  # fmt: skip
    with common.sessions(settings)() as session:
        found = find_run(session, run)
        if found is None:
            fail(f"no run {run!r}")
        with _progress("scoring") as progress:
            report = rescore_run(
                session, storage_from_settings(settings), scorer, found.id, progress=progress
            )
    console.print(
        f"run {found.name!r}: {report.scored} images scored, {report.already} already scored "
        f"by this scorer ({scorer.identity[:10]})"
    )


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal; nothing (quiet logs) otherwise."""
    if not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
