"""The catalogue: a CSV file, a spreadsheet, a JSON Lines file or a database (a table or a
query); a Shopify product export (CSV or spreadsheet) is read as products or variants.

``open_catalogue`` picks the reader from the location the user gave, so the rest of the
producer sees one shape (``CatalogueSource``) whatever the catalogue is stored in.

The catalogue can be large (hundreds of thousands of rows), so rows are read one at a
time and never collected into a list.  Every problem is reported with the file (or a label
such as ``sql:products``), the physical line (or row number) where the offending record
starts and, where it applies, the column.

One module per kind of source (:mod:`~producer.catalogue.csv`,
:mod:`~producer.catalogue.spreadsheet`, :mod:`~producer.catalogue.jsonl`,
:mod:`~producer.catalogue.sql`, and :mod:`~producer.catalogue.shopify` over a CSV file or
spreadsheet); what they share (rows, errors, cell checks) is in
:mod:`~producer.catalogue.common`; :mod:`~producer.catalogue.sniff` names a file whose bytes
are another format than its name says.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from producer.catalogue.common import CatalogueError, CatalogueRow
from producer.catalogue.csv import CsvCatalogue
from producer.catalogue.jsonl import JsonlCatalogue
from producer.catalogue.shopify import HANDLE, ShopifyCatalogue, looks_like_shopify
from producer.catalogue.sniff import SPREADSHEET_SUFFIXES, check_text_file
from producer.catalogue.spreadsheet import SpreadsheetCatalogue
from producer.catalogue.sql import SqlCatalogue

__all__ = ["FORMATS", "CatalogueError", "CatalogueRow", "CatalogueSource", "open_catalogue"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# What --format accepts: how to read a catalogue file, whatever its name says.
FORMATS = ("csv", "jsonl", "spreadsheet", "shopify")


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
    sheet: str | None = None,
    format: str | None = None,
    key: str | None = None,
) -> CatalogueSource:
    """Opens a catalogue: a database URL (with ``://``), or a file read by its ``format``
    (one of :data:`FORMATS`; None: by the file's name, ``.jsonl``/``.ndjson``, ``.xlsx``/
    ``.xlsm``/``.ods``, anything else CSV). A CSV file or spreadsheet whose header is a
    Shopify product export's is read as one (``format="shopify"`` insists on it; ``"csv"``
    and ``"spreadsheet"`` read it row by row), with items per product or per variant by
    ``key``, the template file's key column. Options that do not apply to the kind of
    source are refused rather than silently ignored."""
    if format is not None and format not in FORMATS:
        raise CatalogueError(
            location, None, None, f"unknown --format {format!r} (use one of {', '.join(FORMATS)})"
        )
    if "://" in location:
        # Any SQLAlchemy URL: postgresql+psycopg://..., sqlite:///catalogue.db, ...
        if encoding is not None or delimiter is not None or sheet is not None:
            raise CatalogueError(
                "sql",
                None,
                None,
                "--encoding, --delimiter and --sheet apply only to catalogue files",
            )
        if format is not None:
            raise CatalogueError("sql", None, None, "--format applies only to catalogue files")
        return SqlCatalogue(location, table=table, query=query)
    path = _catalogue_file(location)
    if table is not None or query is not None:
        raise CatalogueError(path, None, None, "--table and --query apply only to a database URL")
    kind = _file_kind(path, format)
    if kind == "jsonl":
        if delimiter is not None:
            raise CatalogueError(path, None, None, "--delimiter applies only to CSV catalogues")
        if sheet is not None:
            raise CatalogueError(path, None, None, "--sheet applies only to spreadsheets")
        check_text_file(path, "JSON Lines text", encoding)
        return JsonlCatalogue(path, encoding=encoding or "utf-8")
    source: CsvCatalogue | SpreadsheetCatalogue
    if kind == "spreadsheet":
        if encoding is not None or delimiter is not None:
            raise CatalogueError(
                path, None, None, "--encoding and --delimiter apply only to text files"
            )
        source = SpreadsheetCatalogue(path, sheet=sheet)
    else:
        if sheet is not None:
            raise CatalogueError(path, None, None, "--sheet applies only to spreadsheets")
        check_text_file(path, "CSV text", encoding)
        source = CsvCatalogue(path, encoding=encoding or "utf-8-sig", delimiter=delimiter)
    if format == "shopify" or (format is None and looks_like_shopify(source.columns)):
        return ShopifyCatalogue(source, key=key or HANDLE)
    return source


def _catalogue_file(location: str) -> Path:
    """The catalogue file at ``location``; refuses a folder or a path with no file."""
    path = Path(location)
    if path.is_dir():
        raise CatalogueError(path, None, None, "is a folder, not a catalogue file")
    if not path.exists() and not path.is_symlink():
        raise CatalogueError(path, None, None, "no such file")
    return path


def _file_kind(path: Path, format: str | None) -> str:
    if format in ("csv", "jsonl", "spreadsheet"):
        return format
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        if format == "shopify":
            raise CatalogueError(path, None, None, "a Shopify export is a CSV file or spreadsheet")
        return "jsonl"
    return "spreadsheet" if suffix in SPREADSHEET_SUFFIXES else "csv"
