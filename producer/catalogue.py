"""Streaming readers for the catalogue: CSV, JSON Lines and SQL (a table or a query).

The catalogue can be large (hundreds of thousands of rows), so rows are read one at a
time and never collected into a list.  Every problem is reported with the file (or a label
such as ``sql:products``), the physical line (or row number) where the offending record
starts and, where it applies, the column.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import json
import re
import uuid
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import Connection, MetaData, Table, create_engine, select, text
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, NoSuchTableError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import Executable

from db.limits import unstorable
from pixelmill.errors import InputError, PixelmillError

# How much of a catalogue file is read and decoded at a time.
READ_BYTES = 64 * 1024


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


def _require_columns(
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


def _raise_problems(rows: Generator[CatalogueRow]) -> Iterator[CatalogueRow]:
    """Plain iteration over a catalogue stops at the first bad record."""
    try:
        for row in rows:
            if row.problem is not None:
                raise row.problem
            yield row
    finally:
        rows.close()  # now, while its database connection is still usable


class _Source:
    """Decodes a binary file and hands out its lines, counting physical lines.

    Decoding is done here rather than by ``open(..., encoding=...)`` so that a bad byte is
    reported on the line that contains it instead of wherever the text layer's read buffer
    happened to fail.  The file is decoded first and split into lines after: in UTF-16 (Excel's
    "Unicode Text") a newline is two bytes, and a 0x0A byte can be half of another character.
    """

    def __init__(self, path: Path, raw: BinaryIO, encoding: str) -> None:
        self._path = path
        self._raw = raw
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        # Physical line number of the last line handed out.
        self.line = 0

    def __iter__(self) -> Iterator[str]:
        # Only "\n" ends a line, and line endings are kept: the csv module sees exactly what
        # newline="" would give it ("\r\n" is its business, and quoted newlines survive).
        pending: list[str] = []  # decoded pieces of a line whose end has not been read yet
        at_start = True
        while True:
            data = self._raw.read(READ_BYTES)
            final = not data
            text, error = self._decode(data, final=final)
            if at_start and text:
                # A byte order mark is not content (utf-8-sig and utf-16 drop it already;
                # utf-8 or utf-16-le given explicitly would keep it in the first column name).
                text = text.removeprefix("\ufeff")
                at_start = False
            *complete, rest = text.split("\n")
            for piece in complete:
                pending.append(piece)
                self.line += 1
                yield "".join(pending) + "\n"
                pending = []
            if rest:
                pending.append(rest)
            if error is not None:
                # The lines before the bad byte are handed out first, so the error comes
                # where it did when the file was read line by line.
                raise self._not_valid(error, position=sum(map(len, pending)))
            if final:
                break
        if pending:
            self.line += 1
            yield "".join(pending)

    def _decode(self, data: bytes, *, final: bool) -> tuple[str, UnicodeDecodeError | None]:
        """The text of ``data``; on a bad byte, the text before it and the error."""
        state = self._decoder.getstate()
        try:
            return self._decoder.decode(data, final), None
        except UnicodeDecodeError as exc:
            error = exc
        # Only on this error path: decode the chunk again from the same state, a byte at a
        # time, to find the text before the bad byte (and so its line).
        decoder = codecs.getincrementaldecoder(self._encoding)(errors="strict")
        decoder.setstate(state)
        good: list[str] = []
        try:
            for index in range(len(data)):
                good.append(decoder.decode(data[index : index + 1], False))
            decoder.decode(b"", final)
        except UnicodeDecodeError as exc:
            return "".join(good), exc
        # A codec that fails only on the whole chunk: the error is placed at the chunk's
        # first line, which is still the file's error.
        return "", error

    def _not_valid(self, exc: UnicodeDecodeError, *, position: int) -> CatalogueError:
        bad = exc.object[exc.start : exc.start + 1].hex()
        # The error is on the line being read, after the ones already handed out;
        # ``position`` counts the characters of that line before the bad byte.
        return CatalogueError(
            self._path,
            self.line + 1,
            None,
            f"not valid {self._encoding} (byte 0x{bad} at position {position}); pass --encoding",
        )


def _blank(cells: list[str]) -> bool:
    # Blank lines, and rows of empty cells such as the ",,," rows spreadsheets leave at the
    # end of an export, carry no data; skipping them is friendlier than a ragged-row error.
    return all(not cell.strip() for cell in cells)


def _check_encoding(path: Path, encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CatalogueError(path, None, None, f"unknown encoding {encoding!r}") from None


def _open_binary(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise CatalogueError(path, None, None, f"cannot open: {exc.strerror}") from None


# Delimiters the sniffer may pick; anything else must be given explicitly.
SNIFF_DELIMITERS = ",;\t|"
SNIFF_BYTES = 16 * 1024


def _sniff_delimiter(path: Path, encoding: str) -> str:
    """Guesses the delimiter from the start of the file; "," when unsure."""
    with _open_binary(path) as raw:
        data = raw.read(SNIFF_BYTES)
        truncated = bool(raw.read(1))
    # Bad bytes are reported (with their line) by the real read; here they only must not
    # stop the guess.  final=False keeps a multi-byte character cut at the end out.
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    sample = decoder.decode(data, final=not truncated)
    if truncated and "\n" in sample:
        # A cut-off last line would skew the per-line delimiter counts.
        sample = sample[: sample.rindex("\n") + 1]
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=SNIFF_DELIMITERS).delimiter
    except csv.Error:
        return ","
    # A single-column catalogue has no delimiter in its header; a ";" or "|" inside its
    # values must not be taken for one.
    header = sample.split("\n", 1)[0]
    return delimiter if delimiter in header else ","


class CsvCatalogue:
    """A catalogue CSV whose header is read on construction and whose rows are streamed.

    ``delimiter`` None means: sniff it from the first few KB (one of ``,;\\t|``), and fall
    back to "," when the sample is ambiguous.
    """

    def __init__(
        self, path: Path, *, encoding: str = "utf-8-sig", delimiter: str | None = None
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        # utf-8-sig reads plain UTF-8 too and drops the BOM Excel puts in front.
        self.encoding = encoding
        _check_encoding(self.path, encoding)
        if delimiter is None:
            delimiter = _sniff_delimiter(self.path, encoding)
        elif len(delimiter) != 1 or delimiter in '"\r\n':
            raise CatalogueError(
                self.path, None, None, f"delimiter must be one character, not {delimiter!r}"
            )
        self.delimiter = delimiter
        # Read the header now so a broken file fails before any work is queued.
        self.columns: list[str] = []
        for line, cells in self._records(with_header=True):
            self.columns = self._check_header(line, cells)
            break
        else:
            raise CatalogueError(self.path, 1, None, "file is empty")

    def _check_header(self, line: int, cells: list[str]) -> list[str]:
        columns = [cell.strip() for cell in cells]
        seen: dict[str, int] = {}
        for position, name in enumerate(columns, start=1):
            if not name:
                raise CatalogueError(
                    self.path, line, None, f"column {position} of the header has an empty name"
                )
            reason = unstorable(name)
            if reason is not None:
                raise CatalogueError(
                    self.path, line, None, f"column {position} of the header {reason}"
                )
            if name in seen:
                raise CatalogueError(
                    self.path,
                    line,
                    name,
                    f"duplicate column name (columns {seen[name]} and {position})",
                )
            seen[name] = position
        return columns

    def _records(self, *, with_header: bool) -> Iterator[tuple[int, list[str]]]:
        """Yields (start line, cells) for each non-blank record, header first."""
        with _open_binary(self.path) as raw:
            source = _Source(self.path, raw, self.encoding)
            reader = csv.reader(source, delimiter=self.delimiter, strict=True)
            header_seen = False
            while True:
                # The record starts on the line after the last one the previous record used.
                start = source.line + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise CatalogueError(self.path, start, None, f"malformed CSV: {exc}") from None
                if _blank(cells):
                    continue
                if not header_seen:
                    header_seen = True
                    if not with_header:
                        continue
                yield start, cells

    def __iter__(self) -> Iterator[CatalogueRow]:
        return _raise_problems(self.rows())

    def rows(self) -> Generator[CatalogueRow]:
        """Every record, bad ones carrying their ``problem``; file-level errors raise."""
        width = len(self.columns)
        for line, cells in self._records(with_header=False):
            if len(cells) != width:
                problem = CatalogueError(
                    self.path,
                    line,
                    None,
                    f"row has {len(cells)} cells but the header has {width} columns",
                )
                yield CatalogueRow(line=line, fields={}, problem=problem)
                continue
            fields = {name: cell.strip() for name, cell in zip(self.columns, cells, strict=True)}
            bad_cell = self._unstorable_cell(line, fields)
            if bad_cell is not None:
                yield CatalogueRow(line=line, fields={}, problem=bad_cell)
                continue
            yield CatalogueRow(line=line, fields=fields)

    def _unstorable_cell(self, line: int, fields: dict[str, str]) -> CatalogueError | None:
        for name, value in fields.items():
            reason = unstorable(value)
            if reason is not None:
                return CatalogueError(self.path, line, name, reason)
        return None

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Fails on the first column in ``needed`` that the header (line 1) lacks (a header
        names every row's columns, so ``every_row`` makes no difference)."""
        _require_columns(self.path, 1, self.columns, needed, who)


class _UnsupportedValue(PixelmillError):
    """A value that has no sensible text form for a template (the reason says why)."""


def _text(value: object) -> str:
    """The text a template sees for one JSON or SQL value."""
    plain = _plain_text(value)
    reason = unstorable(plain)
    if reason is not None:
        raise _UnsupportedValue(reason)
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
    if isinstance(value, list | tuple | dict | _JsonObject):
        raise _UnsupportedValue("nested values are not supported")
    if isinstance(value, bytes | bytearray | memoryview):
        raise _UnsupportedValue("binary values are not supported")
    # Anything else a driver may return (intervals, ranges, enums): its plain text form.
    return str(value)


class _JsonObject(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, so duplicate keys can be reported."""


def _reject_constant(name: str) -> None:
    # json.loads accepts NaN and Infinity, which are not JSON and have no place in a prompt.
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "a number"


class JsonlCatalogue:
    """A JSON Lines catalogue: one JSON object per line, blank lines skipped.

    There is no header, so ``columns`` is None and rows may carry different keys.
    ``require_columns`` records the keys every row must have (the item key) and iteration
    checks them on every row.
    """

    columns: list[str] | None = None

    def __init__(self, path: Path, *, encoding: str = "utf-8") -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.encoding = encoding
        _check_encoding(self.path, encoding)
        # Required key -> who requires it, in the order they were asked for.
        self._required: dict[str, str] = {}
        # Fail on an unreadable or empty file now, before any work is queued; this reads
        # only up to the first record.
        for _ in self._lines():
            break
        else:
            raise CatalogueError(self.path, 1, None, "file is empty")

    def _lines(self) -> Iterator[tuple[int, str]]:
        """Yields (physical line, text) for each non-blank line."""
        with _open_binary(self.path) as raw:
            source = _Source(self.path, raw, self.encoding)
            # A BOM (not JSON, but editors on Windows still write one) is dropped by _Source.
            for text_line in source:
                if text_line.strip():
                    yield source.line, text_line

    def __iter__(self) -> Iterator[CatalogueRow]:
        return _raise_problems(self.rows())

    def rows(self) -> Generator[CatalogueRow]:
        """Every record, bad ones carrying their ``problem``; file-level errors raise."""
        for line, text_line in self._lines():
            try:
                fields = self._fields(line, text_line)
            except CatalogueError as problem:
                yield CatalogueRow(line=line, fields={}, problem=problem)
                continue
            yield CatalogueRow(line=line, fields=fields)

    def _fields(self, line: int, text_line: str) -> dict[str, str]:
        try:
            value = json.loads(
                text_line, object_pairs_hook=_JsonObject, parse_constant=_reject_constant
            )
        except json.JSONDecodeError as exc:
            raise CatalogueError(
                self.path, line, None, f"not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise CatalogueError(self.path, line, None, str(exc)) from None
        if not isinstance(value, _JsonObject):
            raise CatalogueError(
                self.path, line, None, f"expected a JSON object, got {_json_kind(value)}"
            )
        fields: dict[str, str] = {}
        for key, item in value:
            if not key.strip():
                raise CatalogueError(self.path, line, None, "a key is empty")
            reason = unstorable(key)
            if reason is not None:
                raise CatalogueError(self.path, line, None, f"key {key!r} {reason}")
            if key in fields:
                raise CatalogueError(self.path, line, key, "duplicate key")
            try:
                fields[key] = _text(item)
            except _UnsupportedValue as exc:
                raise CatalogueError(self.path, line, key, str(exc)) from None
        for name, who in self._required.items():
            if name not in fields:
                raise CatalogueError(
                    self.path,
                    line,
                    name,
                    f"key required by {who} is missing (keys: {', '.join(fields)})",
                )
        return fields

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Records keys that every row must have; iteration fails on a row that lacks one.

        Keys only some rows need (``every_row=False``: a template's, which with a ``when``
        needs its prompt and image keys only on the rows it applies to) are not recorded:
        rows may carry different keys, and the template reports a key missing from a row it
        applies to itself, naming the row's line and the key (a CSV or SQL catalogue checks
        them in its header instead, where every row has every column).
        """
        if not every_row:
            return
        for name in needed:
            self._required.setdefault(name, who)


# A query may start with comments; they are skipped before looking at its first word.
_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.DOTALL)
_READ_KEYWORDS = ("select", "with")
# SQLSTATE of "cannot execute ... in a read-only transaction".
_READ_ONLY_VIOLATION = "25006"


def _db_message(exc: DBAPIError) -> str:
    # The driver's own message, first line only: SQLAlchemy's text repeats the statement
    # and adds a link, which buries the reason.
    message = str(exc.orig).strip() or type(exc.orig).__name__
    return message.splitlines()[0]


class SqlCatalogue:
    """A catalogue read from a database table or a read-only query, streamed in batches.

    Rows are fetched through a server-side cursor ``batch_size`` at a time.  ``line`` is the
    1-based row number and errors are placed at ``sql:<table>`` or ``sql:query``.  A table's
    rows come in primary key order when it has one, so row numbers are repeatable.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str | None = None,
        query: str | None = None,
        batch_size: int = 1000,
    ) -> None:
        if (table is None) == (query is None):
            raise CatalogueError(
                "sql", None, None, "give --table or --query (exactly one) for a database URL"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.path = f"sql:{table}" if table is not None else "sql:query"
        self.name = self.path
        self.batch_size = batch_size
        self._engine = self._create_engine(url)
        self._read_only_transaction = self._engine.dialect.name == "postgresql"
        self._table: Table | None = None
        self._query = query
        if table is not None:
            self._table = self._reflect(table)
            self.columns: list[str] = [column.name for column in self._table.columns]
        else:
            assert query is not None
            self._check_query_start(query)
            self.columns = self._query_columns()
        self._check_columns(self.columns)

    def _create_engine(self, url: str) -> Engine:
        try:
            # NullPool: a catalogue is read once; a pooled connection would only linger,
            # and no session setting can leak from one use to the next.
            return create_engine(url, poolclass=NullPool)
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            # The URL itself is left out of the message: it may hold a password.
            raise CatalogueError(self.path, None, None, f"bad database URL: {exc}") from None

    def _connect(self) -> Connection:
        try:
            conn = self._engine.connect()
        except DBAPIError as exc:
            raise CatalogueError(
                self.path, None, None, f"cannot connect to the database: {_db_message(exc)}"
            ) from None
        if self._read_only_transaction:
            # The first statement begins the transaction, so this is right after BEGIN:
            # whatever the query does, Postgres refuses to write.
            conn.execute(text("SET TRANSACTION READ ONLY"))
        return conn

    def _reflect(self, table: str) -> Table:
        schema, _, name = table.rpartition(".")
        with self._connect() as conn:
            try:
                # Reflection quotes the name correctly and tells a missing table apart.
                return Table(name, MetaData(), schema=schema or None, autoload_with=conn)
            except NoSuchTableError:
                raise CatalogueError(
                    self.path, None, None, f"table {table!r} does not exist"
                ) from None
            except DBAPIError as exc:
                raise CatalogueError(
                    self.path, None, None, f"cannot read table {table!r}: {_db_message(exc)}"
                ) from None

    def _check_query_start(self, query: str) -> None:
        # Only a guard against the obvious (DELETE, UPDATE, DROP, ...) with a clear message;
        # on Postgres the read-only transaction is what really stops writes (a writing
        # function called from a SELECT, say).
        body = _LEADING_COMMENTS.sub("", query, count=1)
        first = body.split(None, 1)[0].lower() if body.strip() else ""
        if first.lstrip("(") not in _READ_KEYWORDS:
            raise CatalogueError(
                self.path,
                None,
                None,
                f"only read-only queries are allowed (starting with SELECT or WITH), "
                f"not {first.upper() or 'an empty query'!r}",
            )

    def _query_columns(self) -> list[str]:
        # Executing opens a server-side cursor; on Postgres that plans the query but
        # fetches nothing, so this is cheap and also catches a bad query early.
        with self._connect() as conn:
            result = self._execute(conn)
            try:
                return list(result.keys())
            finally:
                result.close()

    def _check_columns(self, columns: list[str]) -> None:
        seen: set[str] = set()
        for name in columns:
            if name in seen:
                raise CatalogueError(self.path, None, name, "duplicate column name")
            seen.add(name)

    def _statement(self) -> Executable:
        if self._table is not None:
            key = list(self._table.primary_key.columns)
            return select(self._table).order_by(*key)
        assert self._query is not None
        return text(self._query)

    def _execute(self, conn: Connection) -> CursorResult[Any]:
        streaming = conn.execution_options(stream_results=True, yield_per=self.batch_size)
        try:
            return streaming.execute(self._statement())
        except DBAPIError as exc:
            raise self._query_error(exc, row=None) from None

    def _query_error(self, exc: DBAPIError, *, row: int | None) -> CatalogueError:
        message = _db_message(exc)
        sqlstate = getattr(exc.orig, "sqlstate", None)
        # Postgres refuses a writing WITH inside a cursor before the read-only transaction
        # would; both mean the same thing to the person who wrote the query.
        if sqlstate == _READ_ONLY_VIOLATION or "data-modifying" in message:
            reason = f"the query tries to write; catalogue queries are read-only ({message})"
        else:
            reason = f"query failed: {message}"
        return CatalogueError(self.path, row, None, reason)

    def __iter__(self) -> Iterator[CatalogueRow]:
        return _raise_problems(self.rows())

    def rows(self) -> Generator[CatalogueRow]:
        """Every record, bad ones carrying their ``problem``; query errors raise."""
        with self._connect() as conn:
            result = self._execute(conn)
            with result:
                if list(result.keys()) != self.columns:
                    raise CatalogueError(
                        self.path, None, None, "the columns changed while the catalogue was read"
                    )
                number = 0
                rows = iter(result)
                while True:
                    try:
                        values = next(rows)
                    except StopIteration:
                        return
                    except DBAPIError as exc:
                        raise self._query_error(exc, row=number + 1) from None
                    number += 1
                    try:
                        fields = self._fields(number, values)
                    except CatalogueError as problem:
                        yield CatalogueRow(line=number, fields={}, problem=problem)
                        continue
                    yield CatalogueRow(line=number, fields=fields)

    def _fields(self, number: int, values: Iterable[object]) -> dict[str, str]:
        fields: dict[str, str] = {}
        for name, value in zip(self.columns, values, strict=True):
            try:
                fields[name] = _text(value)
            except _UnsupportedValue as exc:
                raise CatalogueError(self.path, number, name, str(exc)) from None
        return fields

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Fails on the first column in ``needed`` that the table or query lacks (they are
        every row's columns, so ``every_row`` makes no difference)."""
        _require_columns(self.path, None, self.columns, needed, who)
