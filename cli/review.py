"""`pixelmill review` (the review web app), `pixelmill reviewer ...` (its accounts) and
`pixelmill export` (the kept images of a run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import common
from cli.common import EXIT_BAD_INPUT, console, err, fail

reviewer_app = typer.Typer(help="Reviewer accounts of the review app.", no_args_is_help=True)

PasswordStdinOption = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


def review(
    host: Annotated[str | None, typer.Option(help="Default: PIXELMILL_REVIEW_HOST.")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Default: PIXELMILL_REVIEW_PORT.")
    ] = None,
) -> None:
    """Serve the review web app (log in with an account from `pixelmill reviewer add`)."""
    import uvicorn

    from review.app import create_app

    settings = common.settings()
    if not settings.database_url:
        # The embedded setup on a fresh machine: make the SQLite schema, as the demo does.
        from db.migrate import upgrade

        upgrade(settings.resolved_database_url)
    if host:
        # Before the app is built: whether cookies are Secure by default depends on the host.
        settings = settings.model_copy(update={"review_host": host})
    app = create_app(settings)  # a missing or short secret key is bad input: exit 2
    host = settings.review_host
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
    password_stdin: PasswordStdinOption = False,
) -> None:
    """Create a reviewer account (asks for the password)."""
    from review.accounts import add_reviewer

    settings = common.settings()
    password = _password(password_stdin)
    with common.sessions(settings)() as session:
        add_reviewer(session, name, password, admin=admin)
    console.print(f"reviewer {name!r} added{' (admin)' if admin else ''}")


@reviewer_app.command("password")
def reviewer_password(name: str, password_stdin: PasswordStdinOption = False) -> None:
    """Set a reviewer's password (their open sessions end)."""
    from review.accounts import set_password

    settings = common.settings()
    password = _password(password_stdin)
    with common.sessions(settings)() as session:
        set_password(session, name, password)
    console.print(f"password of {name!r} changed")


@reviewer_app.command("list")
def reviewer_list() -> None:
    """The reviewer accounts."""
    from sqlalchemy import select

    from db.models import Reviewer

    with common.sessions(common.settings())() as session:
        for reviewer in session.scalars(select(Reviewer).order_by(Reviewer.name)):
            console.print(f"{reviewer.name}{'  admin' if reviewer.is_admin else ''}")


def export(
    run: Annotated[str, typer.Argument(help="Run name or id.")],
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    copy_approved: Annotated[
        bool, typer.Option("--copy-approved", help="Also copy the keepers under approved/.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
    channel: Annotated[
        list[str] | None,
        typer.Option(
            "--channel", help="A sales channel's preset (repeatable): its files go to --to."
        ),
    ] = None,
    presets: Annotated[
        Path | None,
        typer.Option(help="Channel presets file. Default: PIXELMILL_CHANNEL_PRESETS_PATH."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="With --channel: a folder, a .zip file or s3://BUCKET/PREFIX."),
    ] = None,
) -> None:
    """One row per kept image of RUN: item key, storage URL, prompt, seed, model, ...

    With --channel: each keeper as each channel's file (sized, encoded, marked as
    AI-generated), written to --to with a manifest; run again, it adds only what is missing.
    """
    if channel or to is not None or presets is not None:
        from cli.channels import export_to_channels

        rows_options = out is not None or copy_approved or format != "csv"
        export_to_channels(run, channel or [], presets, to, rows_options=rows_options)
        return
    from db.runs import find_run
    from pixelmill.storage import storage_from_settings
    from review.export import FORMATS, export_lines, open_items_left_out

    if format not in FORMATS:
        fail(f"--format {format!r}: use one of {', '.join(FORMATS)}", EXIT_BAD_INPUT)
    settings = common.settings()
    with common.sessions(settings)() as session:
        found = find_run(session, run)
        if found is None:
            fail(f"no run named {run!r}", EXIT_BAD_INPUT)
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
        left_out = open_items_left_out(session, found)
    if left_out:
        err.print(f"{left_out} items not submitted yet were left out (only decided items export)")
