"""`pixelmill db ...`: the database schema."""

from __future__ import annotations

import typer

from cli import common
from cli.common import console, fail
from pixelmill.errors import BadInputError

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from alembic.util import CommandError

    from db.migrate import upgrade

    settings = common.settings()
    try:
        upgrade(settings.resolved_database_url, revision)
    except CommandError as exc:
        # An unknown revision, or a database whose revision this code does not know.
        raise BadInputError(f"db upgrade --revision {revision!r}: {exc}") from None
    console.print(f"database at {revision}: {common.safe_url(settings.resolved_database_url)}")


@app.command("check")
def db_check() -> None:
    """Fail if the models and the migrations disagree."""
    from alembic.util import CommandError

    from db.migrate import check

    try:
        check(common.settings().resolved_database_url)
    except CommandError as exc:
        fail(" ".join(str(exc).split()))
    console.print("models and migrations agree")
