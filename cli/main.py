"""The ``pixelmill`` command line: one entry point, one subcommand per job.

Each command group lives in its own module of this package; this one puts them together.
"""

from __future__ import annotations

import typer

from cli import db, model, rank, runs, webhooks
from cli.common import Commands
from cli.demo import demo
from cli.dispatch import dispatch
from cli.finish import finish
from cli.monitoring import exporter
from cli.produce import produce
from cli.reproduce import reproduce
from cli.review import export, review, reviewer_app
from cli.score import score
from cli.status import status
from cli.worker import worker

app = typer.Typer(
    cls=Commands,
    help="pixelmill: nightly bulk image production with Stable Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
for command in (
    produce, dispatch, worker, status, runs.runs, demo, review, export, exporter, score, finish,
    reproduce,
):  # fmt: skip
    app.command()(command)
app.add_typer(db.app, name="db")
app.add_typer(model.app, name="model")
app.add_typer(runs.app, name="run")
app.add_typer(reviewer_app, name="reviewer")
app.add_typer(rank.app, name="rank")
app.add_typer(webhooks.app, name="webhooks")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
