"""What every catalogue reader shares: its rows, its errors and the checks on its cells."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from db.limits import unstorable
from pixelmill.errors import InputError, PixelmillError


class CatalogueError(InputError):
    """A problem with the catalogue file, located by file, line and field."""


@dataclass(frozen=True)
class CatalogueRow:
    """One catalogue record.

    ``line`` is the 1-based physical line where the record starts (the header is line 1),
    which stays correct when earlier quoted cells contain newlines.
    """

    line: int
    fields: dict[str, str]
    # A problem confined to this record (a ragged row, a bad JSON line): the producer reports
    # it and goes on with the next record. ``fields`` is then empty.
    problem: CatalogueError | None = None


def require_columns_in(
    path: str | Path,
    line: int | None,
    columns: list[str],
    needed: Iterable[str],
    who: str,
) -> None:
    present = set(columns)
    for name in needed:
        if name not in present:
            raise CatalogueError(
                path,
                line,
                name,
                f"column required by {who} is missing (columns: {', '.join(columns)})",
            )


def raise_problems(rows: Generator[CatalogueRow]) -> Iterator[CatalogueRow]:
    """Plain iteration over a catalogue stops at the first bad record."""
    try:
        for row in rows:
            if row.problem is not None:
                raise row.problem
            yield row
    finally:
        rows.close()  # now, while its database connection is still usable


class UnsupportedValue(PixelmillError):
    """A value that has no sensible text form for a template (the reason says why)."""


def cell_text(value: object) -> str:
    """The text a template sees for one JSON or SQL value."""
    plain = _plain_text(value)
    reason = unstorable(plain)
    if reason is not None:
        raise UnsupportedValue(reason)
    return plain


def _plain_text(value: object) -> str:
    # bool before int: True is an int, and "True" would surprise a template author.
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    # A JSON object arrives as the list of its (key, value) pairs (see jsonl).
    if isinstance(value, list | tuple | dict):
        raise UnsupportedValue("nested values are not supported")
    if isinstance(value, bytes | bytearray | memoryview):
        raise UnsupportedValue("binary values are not supported")
    # Anything else a driver may return (intervals, ranges, enums): its plain text form.
    return str(value)
