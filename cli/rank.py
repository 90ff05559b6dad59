"""`pixelmill rank ...`: the keeper models learned from reviewers' decisions."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import common
from cli.common import console

app = typer.Typer(help="Keeper models learned from review decisions.", no_args_is_help=True)


@app.command("train")
def train(
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Train every source with decisions now, not only those due "
            "(PIXELMILL_KEEPER_MIN_DECISIONS, PIXELMILL_KEEPER_RETRAIN_EVERY).",
        ),
    ] = False,
) -> None:
    """Train the next keeper model of each catalogue source that is due, and predict its
    images with it."""
    from review.ranking.retrain import retrain_due

    settings = common.settings()
    with common.sessions(settings)() as session:
        outcomes = retrain_due(session, settings, force=force)
    if not outcomes:
        console.print("no source is due for training")
    for outcome in outcomes:
        console.print(f"{outcome.source}: {outcome.reason}")


@app.command("models")
def models() -> None:
    """List the stored keeper model versions."""
    from sqlalchemy import select

    from db.ranking import KeeperModel

    with common.sessions(common.settings())() as session:
        rows = session.scalars(
            select(KeeperModel).order_by(KeeperModel.source, KeeperModel.version)
        ).all()
        for model in rows:
            auc = "n/a" if model.auc is None else f"{model.auc:.3f}"
            console.print(
                f"{model.source}  v{model.version}  trained on {model.trained_on}, "
                f"held out {model.held_out}, AUC {auc}, {model.created_at:%Y-%m-%d %H:%M}",
                markup=False,
                highlight=False,
            )
