"""SQL catalogues: a database table or a read-only query, streamed in batches."""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Iterator
from typing import Any

from sqlalchemy import Connection, MetaData, Table, create_engine, select, text
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, NoSuchTableError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import Executable

from producer.catalogue.common import (
    CatalogueError,
    CatalogueRow,
    UnsupportedValue,
    cell_text,
    raise_problems,
    require_columns_in,
)

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
        return raise_problems(self.rows())

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
                fields[name] = cell_text(value)
            except UnsupportedValue as exc:
                raise CatalogueError(self.path, number, name, str(exc)) from None
        return fields

    def require_columns(self, needed: Iterable[str], *, who: str, every_row: bool = True) -> None:
        """Fails on the first column in ``needed`` that the table or query lacks (they are
        every row's columns, so ``every_row`` makes no difference)."""
        require_columns_in(self.path, None, self.columns, needed, who)
