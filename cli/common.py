"""What every command shares: the settings, database sessions, the two consoles, the exit
statuses, and the one place where bad input becomes a one-line error.

Commands import their heavy dependencies inside their bodies, so `pixelmill --help` stays fast.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperGroup

from pixelmill.errors import BadInputError
from pixelmill.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

console = Console(soft_wrap=True)  # paths and URLs stay on one line
err = Console(stderr=True, soft_wrap=True)

# Exit statuses: scripts and schedulers tell the outcomes apart by them.
EXIT_FAILED = 1  # the command ran and did not succeed: no such run, a job failed, ...
EXIT_BAD_INPUT = 2  # bad input or settings, reported on one line; nothing was done
# `produce` wrote nothing: bad input, --strict with bad rows, --max-jobs exceeded.
EXIT_REFUSED = EXIT_BAD_INPUT
EXIT_PARTIAL = 3  # `produce` wrote the good rows and skipped the bad ones (listed on stderr)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Report ``message`` on stderr and end the command with ``code``."""
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _usage_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """Click's "no arguments: show the help" and usage errors: typer's own copy of click's
    (newer typers) and click's (older typers, and commands written with click)."""
    import click.exceptions

    help_asked: list[type[Exception]] = [click.exceptions.NoArgsIsHelpError]
    usage: list[type[Exception]] = [click.exceptions.UsageError]
    try:
        from typer._click import exceptions as typer_click
    except ImportError:
        pass
    else:
        help_asked.append(typer_click.NoArgsIsHelpError)
        usage.append(typer_click.UsageError)
    return tuple(help_asked), tuple(usage)


HELP_ASKED, USAGE_ERRORS = _usage_errors()


class Commands(TyperGroup):
    """The root command: whatever a command is given, it answers with one line and an exit
    status, never a traceback.

    - Bad input (a :class:`~pixelmill.errors.BadInputError` from any command: a file with its
      place, an option, a setting), a bad option or argument (click's usage errors, such as
      a number out of its bounds) and invalid settings (checked before any command runs)
      are one line on stderr and exit status 2; a command that says more catches it first.
    - A path the system refuses (a folder for a file, a missing or unreadable file) is one
      line naming the path, exit status 2.
    - A service that cannot be reached (the database, the broker) is one line, exit status 1.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _one_line_listings(self)

    # Any: the Context class lives in click, or in typer's own copy of it (newer typers).
    def invoke(self, ctx: Any) -> Any:
        try:
            if not ctx.resilient_parsing:
                load_settings()  # invalid settings: the same answer for every command
            return super().invoke(ctx)
        except HELP_ASKED:
            raise  # `pixelmill db` alone: its help, as asked
        except USAGE_ERRORS as exc:
            context = getattr(exc, "ctx", None)
            where = context.command_path if context is not None else "pixelmill"
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            fail(f"{where}: {' '.join(message.split())} (see --help)", EXIT_BAD_INPUT)
        except BadInputError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except OSError as exc:
            if exc.filename is None or isinstance(exc, ConnectionError):
                fail(f"{type(exc).__name__}: {exc}")
            fail(f"{exc.filename}: {exc.strerror or exc}", EXIT_BAD_INPUT)
        except Exception as exc:
            answer = _known_failure(exc)
            if answer is None:
                raise
            fail(*answer)


def _one_line_listings(group: Any) -> None:
    """Each command's line in its group's listing: the first paragraph of its docstring as
    flowing text. Typer's rich help keeps a docstring's line breaks there, which cut the
    listing's lines in the middle (its full help flows the same paragraph as text)."""
    for command in getattr(group, "commands", {}).values():
        if command.short_help is None and command.help:
            command.short_help = " ".join(command.help.split("\n\n", 1)[0].split())
        _one_line_listings(command)


def _known_failure(exc: Exception) -> tuple[str, int] | None:
    """One line and the exit status for a setting the database or broker refuses or a
    service that could not be reached; None for any other error."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
    from sqlalchemy.exc import InterfaceError as DatabaseInterfaceError

    if isinstance(exc, ArgumentError | NoSuchModuleError):
        return f"invalid settings: PIXELMILL_DATABASE_URL: {exc}", EXIT_BAD_INPUT
    if isinstance(exc, OperationalError | DatabaseInterfaceError) and isinstance(exc, DBAPIError):
        first = str(exc.orig).strip().splitlines()
        reason = first[0] if first else type(exc.orig).__name__
        return f"the database failed: {reason}", EXIT_FAILED
    from kombu.exceptions import OperationalError as BrokerError

    if isinstance(exc, BrokerError):
        return f"the broker failed: {exc}", EXIT_FAILED
    from pixelmill.errors import InfrastructureError

    if isinstance(exc, InfrastructureError):
        return str(exc), EXIT_FAILED
    return None


def settings_problem(exc: Exception) -> str:
    """A pydantic validation error as one line: each variable and what is wrong with it.
    The value given is echoed only where it is safe to print: never a secret's (a key,
    password or token), never the whole environment (a rule across fields has no single
    input), and a URL's password is hidden."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = []
    for error in exc.errors():
        names = [str(part) for part in error["loc"]]
        where = "PIXELMILL_" + "_".join(names).upper() if names else "settings"
        problems.append(f"{where}: {error['msg']}{_echoed_input(names, error.get('input'))}")
    return "; ".join(problems)


_SECRET_NAME = re.compile(r"secret|password|token|access_key|(^|_)key$", re.IGNORECASE)


def _echoed_input(names: list[str], value: object) -> str:
    if isinstance(value, dict) or not names:
        return ""
    if any(_SECRET_NAME.search(name) for name in names):
        return " (value hidden)"
    if isinstance(value, str) and "://" in value and "@" in value:
        try:
            value = safe_url(value)
        except Exception:  # not a URL SQLAlchemy can parse: hide it rather than leak it
            return " (value hidden)"
    return f" (got {value!r})"


def load_settings() -> Settings:
    """The settings from the environment; invalid ones are a BadInputError (one line)."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        raise BadInputError(f"invalid settings: {settings_problem(exc)}") from None


def settings() -> Settings:
    """The settings from the environment, with logging configured and the data folder made;
    invalid settings end the command with exit status 2."""
    loaded = load_settings()
    from pixelmill.logs import configure_logging

    configure_logging(loaded.log_level)
    try:
        loaded.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(
            f"invalid settings: PIXELMILL_DATA_DIR {str(loaded.data_dir)!r}: {exc.strerror or exc}"
        ) from None
    return loaded


def sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions whose connection closes with them: a command holds no pool that outlives it
    (and a watching command reconnects on each poll, riding out a database restart)."""
    from sqlalchemy.pool import NullPool

    from db.session import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.resolved_database_url, poolclass=NullPool))


def safe_url(url: str) -> str:
    """``url`` with its password hidden, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
