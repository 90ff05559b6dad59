"""Where a catalogue comes from: a CSV file, a JSON Lines file or a database.

``open_catalogue`` picks the reader from the location the user gave, so the rest of the
producer sees one shape (``CatalogueSource``) whatever the catalogue is stored in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from producer.catalogue import (
    CatalogueError,
    CatalogueRow,
    CsvCatalogue,
    JsonlCatalogue,
    SqlCatalogue,
)

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class CatalogueSource(Protocol):
    """What the producer needs from a catalogue, whatever it is stored in."""

    @property
    def path(self) -> str | os.PathLike[str]:
        """Where errors are placed: the file, or a label such as ``sql:products``."""
        ...

    @property
    def name(self) -> str:
        """A short stable name of the source: the file name, or the ``sql:...`` label."""
        ...

    @property
    def columns(self) -> list[str] | None:
        """The column names, or None where they are not known up front (JSON Lines)."""
        ...

    def __iter__(self) -> Iterator[CatalogueRow]:
        """Every record; stops with a CatalogueError at the first bad one."""
        ...

    def rows(self) -> Iterator[CatalogueRow]:
        """Every record; a bad record carries its ``problem`` and the stream goes on."""
        ...

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Fails now on a missing column, or (columns None) on each row that lacks one.

        ``every_row=False``: only the rows that use them need these (a template's fields,
        with a ``when``); a source without a header then leaves the check to the template,
        which reports a missing key with the row's line."""
        ...


def open_catalogue(
    location: str,
    *,
    encoding: str | None = None,
    delimiter: str | None = None,
    table: str | None = None,
    query: str | None = None,
) -> CatalogueSource:
    """Opens a catalogue: a database URL (with ``://``), a ``.jsonl``/``.ndjson`` file, or a
    CSV file (anything else).  Options that do not apply to the kind of source are refused
    rather than silently ignored."""
    if "://" in location:
        # Any SQLAlchemy URL: postgresql+psycopg://..., sqlite:///catalogue.db, ...
        if encoding is not None or delimiter is not None:
            raise CatalogueError(
                "sql", None, None, "--encoding and --delimiter apply only to catalogue files"
            )
        return SqlCatalogue(location, table=table, query=query)
    path = Path(location)
    if table is not None or query is not None:
        raise CatalogueError(path, None, None, "--table and --query apply only to a database URL")
    if path.suffix.lower() in JSONL_SUFFIXES:
        if delimiter is not None:
            raise CatalogueError(path, None, None, "--delimiter applies only to CSV catalogues")
        return JsonlCatalogue(path, encoding=encoding or "utf-8")
    return CsvCatalogue(path, encoding=encoding or "utf-8-sig", delimiter=delimiter)
