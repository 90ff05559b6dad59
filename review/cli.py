"""`pixelmill review`, `pixelmill reviewer ...` and `pixelmill export`: registered on the main
command line by pixelmill/cli.py. Heavy imports stay inside the commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

reviewer_app = typer.Typer(help="Reviewer accounts of the review app.", no_args_is_help=True)


def review(
    host: Annotated[str | None, typer.Option(help="Default: PIXELMILL_REVIEW_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: PIXELMILL_REVIEW_PORT.")] = None,
) -> None:
    """Serve the review web app (log in with an account from `pixelmill reviewer add`)."""
    import uvicorn

    from pixelmill.cli import _settings, console, err
    from review.app import create_app
    from review.secret import SecretKeyError

    settings = _settings()
    if not settings.database_url:
        # The embedded setup on a fresh machine: make the SQLite schema, as the demo does.
        from db.migrate import upgrade

        upgrade(settings.resolved_database_url)
    try:
        app = create_app(settings)
    except SecretKeyError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    host = host or settings.review_host
    port = port or settings.review_port
    console.print(f"review app on http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(), access_log=False)


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@reviewer_app.command("add")
def reviewer_add(
    name: str,
    admin: Annotated[bool, typer.Option("--admin", help="May export and read stats.")] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create a reviewer account (asks for the password)."""
    from pixelmill.cli import _sessions, _settings, console, err
    from review.accounts import AccountError, add_reviewer

    settings = _settings()
    password = _password(password_stdin)
    with _sessions(settings)() as session:
        try:
            add_reviewer(session, name, password, admin=admin)
        except AccountError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    console.print(f"reviewer {name!r} added{' (admin)' if admin else ''}")


@reviewer_app.command("password")
def reviewer_password(
    name: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Set a reviewer's password (their open sessions end)."""
    from pixelmill.cli import _sessions, _settings, console, err
    from review.accounts import AccountError, set_password

    settings = _settings()
    password = _password(password_stdin)
    with _sessions(settings)() as session:
        try:
            set_password(session, name, password)
        except AccountError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    console.print(f"password of {name!r} changed")


@reviewer_app.command("list")
def reviewer_list() -> None:
    """The reviewer accounts."""
    from sqlalchemy import select

    from db.models import Reviewer
    from pixelmill.cli import _sessions, _settings, console

    with _sessions(_settings())() as session:
        for reviewer in session.scalars(select(Reviewer).order_by(Reviewer.name)):
            console.print(f"{reviewer.name}{'  admin' if reviewer.is_admin else ''}")


def export(
    run: Annotated[str, typer.Argument(help="Run name or id.")],
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    copy_approved: Annotated[
        bool, typer.Option("--copy-approved", help="Also copy the keepers under approved/.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """One row per kept image of RUN: item key, storage URL, prompt, seed, model, ..."""
    from pixelmill.cli import _sessions, _settings, err
    from pixelmill.status import find_run
    from pixelmill.storage import storage_from_settings
    from review.export import FORMATS, export_lines

    if format not in FORMATS:
        err.print(f"[red]error:[/red] --format {format!r}: use one of {', '.join(FORMATS)}")
        raise typer.Exit(2)
    settings = _settings()
    with _sessions(settings)() as session:
        found = find_run(session, run)
        if found is None:
            err.print(f"[red]error:[/red] no run named {run!r}")
            raise typer.Exit(2)
        storage = storage_from_settings(settings)
        lines = export_lines(session, found, storage, format, copy=copy_approved)
        # newline="": the CSV writer ends records with \r\n itself.
        target = out.open("w", encoding="utf-8", newline="") if out else sys.stdout
        try:
            for line in lines:
                target.write(line)
        finally:
            if out:
                target.close()


def register(app: typer.Typer) -> None:
    app.command("review")(review)
    app.add_typer(reviewer_app, name="reviewer")
    app.command("export")(export)
