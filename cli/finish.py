"""`pixelmill finish RUN`: upscale and caption a run's keepers on demand, here and now."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli import common
from cli.common import EXIT_BAD_INPUT, EXIT_FAILED, console, err, fail


def finish(
    run: Annotated[str, typer.Argument(help="Run name or id.")],
    upscale: Annotated[
        bool, typer.Option(help="Upscale with PIXELMILL_UPSCALE_MODEL (where it is set).")
    ] = True,
    caption: Annotated[
        bool, typer.Option(help="Caption with PIXELMILL_CAPTION_MODEL (where it is set).")
    ] = True,
) -> None:
    """Finish the keepers of RUN's submitted items: upscale them (under approved/), caption
    them with alt text, and fill PIXELMILL_CAPTION_FILL_FIELD where it is empty. Only what
    is missing is made: resumable, and a no-op when run again."""
    from db.runs import find_run
    from worker.finishing.configured import finisher_from_settings

    settings = common.settings()
    if not (upscale and settings.upscale_model) and not (caption and settings.caption_model):
        fail(
            "nothing to do: set PIXELMILL_UPSCALE_MODEL (a model file or 'tiny') or "
            "PIXELMILL_CAPTION_MODEL (a BLIP folder, hub id or 'tiny')",
            EXIT_BAD_INPUT,
        )
    sessions = common.sessions(settings)
    with sessions() as session:
        found = find_run(session, run)
        if found is None:
            fail(f"no run {run!r}")
        run_id, run_name = found.id, found.name
    _quiet_transformers()
    finisher = finisher_from_settings(settings, sessions=sessions, upscale=upscale, caption=caption)
    with _progress_bar("finishing") as progress:
        report = finisher.finish_run(run_id, progress=progress)
    for failure in report.failures:
        err.print(f"[yellow]skipped:[/yellow] {failure}")
    console.print(f"run {run_name!r}: {report.summary()}")
    if report.failures:
        raise typer.Exit(EXIT_FAILED)


def _quiet_transformers() -> None:
    """transformers' notices and progress bars: this command shows its own progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar of the keepers that needed work, on a terminal; nothing otherwise."""
    if not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
