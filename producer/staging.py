"""Staging: how a run's items and jobs reach the real tables.

The producer hands over rows as it expands the catalogue. Every :data:`CHUNK_JOBS` jobs (or
items) the rows gathered so far go into session-private temporary staging tables (Postgres
``COPY``; batched inserts on SQLite) and set-based statements merge them into
``catalogue_items`` and ``jobs``: ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, so that
deduplication against earlier runs (and earlier chunks) happens inside the database, and an
``UPDATE`` before the jobs' insert by which this run takes over the jobs a cancelled run left
unstarted.

All of it runs inside the caller's transaction, which commits only once the whole catalogue
has been accepted, so a refused catalogue still leaves nothing behind; chunks keep memory
flat however large the catalogue is.

A job's kind, options and input images go to a staging table of their own, with a row only
for the jobs that have them: plain txt2img jobs (a bulk run's usual millions) carry nothing
more through COPY than before those columns existed, and the merge takes the defaults.

On Postgres a writer thread does the copying and merging on the session's connection while
the producer expands the next chunk: the database (another process) and Python then work at
the same time, and the thread waits on the socket with the GIL released. The producer must
not use the session between :func:`open_staging` and :meth:`Staging.finish` or
:meth:`Staging.abort`.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import psycopg.sql
from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.models import utcnow

# Jobs per chunk: big enough that a chunk's statements cost little next to its rows, small
# enough that a chunk sorts in Postgres' default work_mem and two chunks in flight stay small.
CHUNK_JOBS = 5_000
# Chunks encoded but not yet merged: the producer waits when the database falls behind.
CHUNKS_IN_FLIGHT = 2
# While the writer thread runs: how long the producer's thread may keep the GIL when the
# writer has a server reply to act on (Python's default, 5 ms, would leave the database idle
# for up to that long after each of a chunk's round trips).
WRITER_SWITCH_INTERVAL = 0.0005

ITEM_COLUMNS = ("ord", "external_key", "content_hash", "fields")
# What varies per job first, then what every job of a template variant shares (JobShape).
JOB_COLUMNS = (
    "ord",
    "item_ord",
    "prompt",
    "negative_prompt",
    "seeds",
    "dedupe_key",
    "template",
    "variant",
    "model",
    "scheduler",
    "steps",
    "guidance",
    "width",
    "height",
)
# Only for jobs beyond a plain prompt (JobShape.option_values), joined by the job's number.
OPTION_COLUMNS = ("ord", "kind", "options", "input_image", "mask_image")

_TABLES = {
    "staging_items": (
        "ord BIGINT NOT NULL, external_key TEXT NOT NULL, content_hash TEXT NOT NULL, fields {json}"
    ),
    "staging_jobs": (
        "ord BIGINT NOT NULL, item_ord BIGINT NOT NULL, "
        "prompt TEXT NOT NULL, negative_prompt TEXT NOT NULL, seeds {json} NOT NULL, "
        "dedupe_key TEXT NOT NULL, template TEXT NOT NULL, variant TEXT NOT NULL, "
        "model TEXT NOT NULL, scheduler TEXT, steps INTEGER NOT NULL, "
        "guidance {float} NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL"
    ),
    "staging_job_options": (
        "ord BIGINT NOT NULL, kind TEXT NOT NULL, options {json}, input_image TEXT, mask_image TEXT"
    ),
}

# "WHERE true": SQLite needs it to parse INSERT ... SELECT ... ON CONFLICT.
_MERGE_ITEMS = (
    "INSERT INTO catalogue_items (source, external_key, fields, content_hash, created_at) "
    "SELECT :source, external_key, fields, content_hash, :now FROM staging_items "
    "WHERE true ON CONFLICT (source, external_key, content_hash) DO NOTHING"
)
# A job whose dedupe key is taken is left alone, except a cancelled one: its run was
# cancelled before it started, and the key would otherwise keep it from ever being produced
# again without --force. This run takes it over, before the insert below (which then finds
# the key taken by a job of this run): the job moves to this run and item (the same pixels,
# perhaps from a newer item version or under another template's name) and starts afresh as
# a new job would: status, attempts, error, worker and the timestamps reset. The pixel
# columns (prompts, model, settings, seeds, kind, options, images) are what the dedupe key
# covers, so they already are this job's. Images it may have from a partial render keep
# their rows: the worker renders only the seeds without one.
# Every other status keeps its job where it is: done, pending, queued and running jobs are
# rendered or under way, and dead, failed and blocked jobs stay ended on purpose: they ended
# on an error (or the blocklist) that producing again would only repeat; --force renders
# them again deliberately.
# An UPDATE of its own rather than the insert's ON CONFLICT DO UPDATE ... WHERE: that locks
# every conflicting row, even those its WHERE leaves alone, so a produce of an unchanged
# catalogue would lock every earlier job it meets (and hold up the workers ending them)
# until it commits. This statement touches cancelled jobs alone.
# The item's id is looked up only for a job taken over (through the unique index), and the
# statement has no leading WITH: Python's sqlite3 gives no rowcount for one.
_TAKE_OVER_JOBS = (
    "UPDATE jobs SET run_id = :run_id, "
    "item_id = (SELECT ci.id FROM catalogue_items ci WHERE ci.source = :source "
    "AND ci.external_key = staged.external_key AND ci.content_hash = staged.content_hash), "
    "template = staged.template, variant = staged.variant, status = 'pending', attempts = 0, "
    "outages = 0, retry_at = NULL, "
    "error = NULL, worker = NULL, created_at = :now, queued_at = NULL, started_at = NULL, "
    "lease_expires_at = NULL, finished_at = NULL "
    "FROM (SELECT s.dedupe_key, s.template, s.variant, si.external_key, si.content_hash "
    "FROM staging_jobs s JOIN staging_items si ON si.ord = s.item_ord) AS staged "
    "WHERE jobs.dedupe_key = staged.dedupe_key AND jobs.status = 'cancelled'"
)
# Each staged item's id is looked up once, through the unique index: a scalar subquery in a
# materialised CTE (the planner can neither hash all the source's items for every chunk nor
# repeat the lookup for each of the item's jobs); each job joins its item by the item's
# number in the staging table.
_MERGE_JOBS = (
    "INSERT INTO jobs (run_id, item_id, template, variant, prompt, negative_prompt, "
    "model, scheduler, steps, guidance, width, height, seeds, status, attempts, "
    "dedupe_key, created_at, kind, options, input_image, mask_image) "
    "WITH i AS MATERIALIZED ("
    "SELECT si.ord, (SELECT ci.id FROM catalogue_items ci WHERE ci.source = :source "
    "AND ci.external_key = si.external_key AND ci.content_hash = si.content_hash) AS id "
    "FROM staging_items si) "
    "SELECT :run_id, i.id, s.template, s.variant, s.prompt, s.negative_prompt, "
    "s.model, s.scheduler, s.steps, s.guidance, s.width, s.height, s.seeds, "
    "'pending', 0, s.dedupe_key, :now, "
    "COALESCE(o.kind, 'txt2img'), o.options, o.input_image, o.mask_image "
    "FROM staging_jobs s JOIN i ON i.ord = s.item_ord "
    "LEFT JOIN staging_job_options o ON o.ord = s.ord "
    "WHERE i.id IS NOT NULL ORDER BY s.ord "
    "ON CONFLICT (dedupe_key) DO NOTHING"
)
# The statements of one chunk's merge, in order; the jobs taken over and inserted (the
# rowcounts of the last two) are the chunk's new jobs.
_MERGES = (_MERGE_ITEMS, _TAKE_OVER_JOBS, _MERGE_JOBS)

# COPY's text format: backslash, tab, newline and carriage return must be escaped.
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_NULL = "\\N"


def copy_text(value: str) -> str:
    """``value`` as one field of a Postgres ``COPY ... FROM STDIN`` (text format) line."""
    if _COPY_SPECIAL.search(value) is None:
        return value
    return value.translate(_COPY_ESCAPES)


# (kind, options, input_image, mask_image) of a plain txt2img job: what the merge defaults to.
_PLAIN = ("txt2img", None, None, None)


@dataclass(frozen=True)
class JobShape:
    """What every job of one template variant shares: the columns after ``dedupe_key``, and
    the job's kind, options and input images.

    A job that starts from a catalogue image carries the row's staged image (and mask) here,
    so the producer makes one shape per row for those; plain jobs share one per variant.
    """

    template: str
    variant: str
    model: str
    scheduler: str | None
    steps: int
    guidance: float
    width: int
    height: int
    kind: str = "txt2img"
    options: str | None = None  # JobOptions.stored() (JSON text); None for no options
    input_image: str | None = None  # sha256 of the staged input image
    mask_image: str | None = None
    values: tuple[Any, ...] = field(init=False, repr=False, compare=False)
    # The same columns as the tail of a COPY text line, encoded once (tab-separated, escaped).
    copy_fields: str = field(init=False, repr=False, compare=False)
    # OPTION_COLUMNS after "ord" (and as COPY text), or None for a plain txt2img job.
    option_values: tuple[Any, ...] | None = field(init=False, repr=False, compare=False)
    copy_options: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = (
            self.template,
            self.variant,
            self.model,
            self.scheduler,
            self.steps,
            self.guidance,
            self.width,
            self.height,
        )
        object.__setattr__(self, "values", values)
        encoded = "\t".join(
            _COPY_NULL
            if value is None
            else repr(value)
            if isinstance(value, float)
            else copy_text(str(value))
            for value in values
        )
        object.__setattr__(self, "copy_fields", encoded)
        option_values = None
        copy_options = None
        if (self.kind, self.options, self.input_image, self.mask_image) != _PLAIN:
            option_values = (self.kind, self.options, self.input_image, self.mask_image)
            copy_options = "\t".join(
                _COPY_NULL if value is None else copy_text(value) for value in option_values
            )
        object.__setattr__(self, "option_values", option_values)
        object.__setattr__(self, "copy_options", copy_options)


# A job as the producer hands it over: (shape, prompt, negative prompt, seeds as a JSON
# array, dedupe key).
StagedJob = tuple[JobShape, str, str, str, str]


class Staging:
    """Takes a run's items and jobs as the catalogue streams and merges them chunk by chunk.

    Call :meth:`add` for every accepted item with its jobs, then :meth:`finish` (which
    returns how many jobs were new), or :meth:`abort` on any error; the caller then commits
    or rolls back the session's transaction.

    The items and jobs are numbered and buffered here; a dialect encodes each row for its
    database (:meth:`_item_row`, :meth:`_job_row`, :meth:`_option_row`) and merges a chunk
    of them (:meth:`_merge`).
    """

    def __init__(self, session: Session, *, run_id: int, source: str, now: datetime) -> None:
        self.session = session
        self.params: dict[str, Any] = {"run_id": run_id, "source": source, "now": now}
        self.jobs_new = 0
        self._pending_jobs = 0
        self._pending_items = 0
        # The dedupe keys of the jobs buffered for the next merge (see add()).
        self._chunk_keys: set[str] = set()
        # The rows of the next merge, as the dialect encodes them.
        self._items: list[Any] = []
        self._jobs: list[Any] = []
        self._options: list[Any] = []
        # The rows' numbers ("ord"), counted over the whole run: a job joins its item by the
        # item's number, its options by its own.
        self._items_added = 0
        self._jobs_added = 0

    def add(
        self,
        key: str,
        content_hash: str,
        fields: Mapping[str, str],
        fields_json: str,
        jobs: list[StagedJob],
    ) -> None:
        """One item (``fields_json``: its fields as JSON) and its jobs, in catalogue order.

        A job whose dedupe key an earlier job of the same chunk has is left out here, and
        counts as unchanged, as when it meets an earlier chunk's job in the merge: the first
        in catalogue order is the one merged. The insert would keep the first anyway, but
        the takeover of a cancelled job (an UPDATE ... FROM the chunk) would pick any.
        """
        keys = self._chunk_keys
        first_in_chunk: list[StagedJob] = []
        for job in jobs:
            if job[4] not in keys:
                keys.add(job[4])
                first_in_chunk.append(job)
        self._buffer(key, content_hash, fields, fields_json, first_in_chunk)
        self._pending_jobs += len(first_in_chunk)
        self._pending_items += 1
        # Items count too: a catalogue whose rows mostly make no jobs would otherwise buffer
        # all of them until the end.
        if self._pending_jobs >= CHUNK_JOBS or self._pending_items >= CHUNK_JOBS:
            self._start_chunk()

    def finish(self) -> int:
        """Merges what is left; returns how many jobs were new (not already in ``jobs``).

        A job taken over from a cancelled run counts as new (see ``_TAKE_OVER_JOBS``).
        """
        self._start_chunk()
        self._close()
        return self.jobs_new

    def abort(self) -> None:
        """Stops merging (waits for a chunk being merged); the caller rolls back."""

    def _buffer(
        self,
        key: str,
        content_hash: str,
        fields: Mapping[str, str],
        fields_json: str,
        jobs: list[StagedJob],
    ) -> None:
        self._items_added += 1
        item = self._items_added
        self._items.append(self._item_row(item, key, content_hash, fields, fields_json))
        job_row, option_row = self._job_row, self._option_row
        rows, options = self._jobs, self._options
        number = self._jobs_added
        for job in jobs:
            number += 1
            rows.append(job_row(number, item, job))
            if job[0].option_values is not None:
                options.append(option_row(number, job[0]))
        self._jobs_added = number

    def _start_chunk(self) -> None:
        """Hands the buffered rows over to be merged; what is added next is a new chunk."""
        self._pending_jobs = 0
        self._pending_items = 0
        self._chunk_keys.clear()
        self._flush()

    def _flush(self) -> None:
        if not self._items:
            return
        chunk = (self._items, self._jobs, self._options)
        self._items, self._jobs, self._options = [], [], []
        self._merge(*chunk)

    def _close(self) -> None:
        _drop_tables(self.session)

    # What a dialect provides: its encoding of each row, and the merge of a chunk of them.

    def _item_row(
        self, item: int, key: str, content_hash: str, fields: Mapping[str, str], fields_json: str
    ) -> Any:
        raise NotImplementedError

    def _job_row(self, number: int, item: int, job: StagedJob) -> Any:
        raise NotImplementedError

    def _option_row(self, number: int, shape: JobShape) -> Any:
        raise NotImplementedError

    def _merge(self, items: list[Any], jobs: list[Any], options: list[Any]) -> None:
        raise NotImplementedError


def open_staging(session: Session, *, run_id: int, source: str) -> Staging:
    """Creates the staging tables in the session's transaction; see :class:`Staging`."""
    postgres = session.get_bind().dialect.name == "postgresql"
    schema = "pg_temp" if postgres else "temp"
    for name, columns in _TABLES.items():
        session.execute(text(f"DROP TABLE IF EXISTS {schema}.{name}"))
        ddl = columns.format(
            json="JSONB" if postgres else "TEXT",
            float="DOUBLE PRECISION" if postgres else "REAL",
        )
        session.execute(text(f"CREATE TEMPORARY TABLE {name} ({ddl})"))
    # One timestamp for the whole run's rows, as when they were merged in one statement.
    now = utcnow()
    if postgres:
        return _PostgresStaging(session, run_id=run_id, source=source, now=now)
    return _SqlStaging(session, run_id=run_id, source=source, now=now)


def _drop_tables(session: Session) -> None:
    for name in _TABLES:
        session.execute(text(f"DROP TABLE {name}"))


class _SqlStaging(Staging):
    """Any other database (SQLite): batched inserts, merged on the caller's thread."""

    def _item_row(
        self, item: int, key: str, content_hash: str, fields: Mapping[str, str], fields_json: str
    ) -> tuple[Any, ...]:
        # Stored as TEXT here, so keep the catalogue's column order (not the sorted JSON).
        return (item, key, content_hash, json.dumps(fields, ensure_ascii=False))

    def _job_row(self, number: int, item: int, job: StagedJob) -> tuple[Any, ...]:
        shape, prompt, negative, seeds, dedupe_key = job
        return (number, item, prompt, negative, seeds, dedupe_key, *shape.values)

    def _option_row(self, number: int, shape: JobShape) -> tuple[Any, ...]:
        assert shape.option_values is not None
        return (number, *shape.option_values)

    def _merge(
        self,
        items: list[tuple[Any, ...]],
        jobs: list[tuple[Any, ...]],
        options: list[tuple[Any, ...]],
    ) -> None:
        for table, columns, rows in (
            ("staging_items", ITEM_COLUMNS, items),
            ("staging_jobs", JOB_COLUMNS, jobs),
            ("staging_job_options", OPTION_COLUMNS, options),
        ):
            if rows:
                placeholders = ", ".join(f":{c}" for c in columns)
                self.session.execute(
                    text(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"),
                    [dict(zip(columns, row, strict=True)) for row in rows],
                )
        now = bindparam("now", self.params["now"], type_=DateTime(timezone=True))
        params = {"run_id": self.params["run_id"], "source": self.params["source"]}
        merge_items, *merge_jobs = _MERGES
        self.session.execute(text(merge_items).bindparams(now), params)
        for merge in merge_jobs:  # the jobs taken over, then the jobs inserted: all new
            result = self.session.execute(text(merge).bindparams(now), params)
            self.jobs_new += int(result.rowcount)  # type: ignore[attr-defined]
        for name in _TABLES:
            self.session.execute(text(f"DELETE FROM {name}"))


def _merge_batch(conn: psycopg.Connection[Any], params: dict[str, Any]) -> str:
    """The merges and emptying the staging tables, as one round trip to the server.

    The statements are written with SQLAlchemy's ":name" parameters; here the values go in
    as quoted literals, because only a query without parameters may hold several statements.
    """

    def literal(match: re.Match[str]) -> str:
        return psycopg.sql.Literal(params[match.group(1)]).as_string(conn)

    merges = [re.sub(r"(?<![:\w]):(\w+)", literal, sql) for sql in _MERGES]
    return "; ".join([*merges, f"TRUNCATE {', '.join(_TABLES)}"])


class _PostgresStaging(Staging):
    """COPY in text format, merged by a writer thread while the producer expands on."""

    def __init__(self, session: Session, *, run_id: int, source: str, now: datetime) -> None:
        super().__init__(session, run_id=run_id, source=source, now=now)
        raw = session.connection().connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        self._writer = _Writer(raw, _merge_batch(raw, self.params))
        self._writer.start()

    def _item_row(
        self, item: int, key: str, content_hash: str, fields: Mapping[str, str], fields_json: str
    ) -> str:
        # JSONB does not keep key order, so the sorted JSON of the content hash serves.
        return f"{item}\t{copy_text(key)}\t{content_hash}\t{copy_text(fields_json)}\n"

    def _job_row(self, number: int, item: int, job: StagedJob) -> str:
        shape, prompt, negative, seeds, dedupe_key = job
        return (
            f"{number}\t{item}\t{copy_text(prompt)}\t{copy_text(negative)}\t{seeds}\t"
            f"{dedupe_key}\t{shape.copy_fields}\n"
        )

    def _option_row(self, number: int, shape: JobShape) -> str:
        return f"{number}\t{shape.copy_options}\n"

    def _merge(self, items: list[str], jobs: list[str], options: list[str]) -> None:
        self._writer.submit(
            ("".join(items).encode(), "".join(jobs).encode(), "".join(options).encode())
        )

    def _close(self) -> None:
        self.jobs_new = self._writer.finish()
        super()._close()

    def abort(self) -> None:
        self._writer.cancel()


class _Writer(threading.Thread):
    """Copies and merges chunks on the session's psycopg connection, one after another."""

    def __init__(self, conn: psycopg.Connection[Any], merge_batch: str) -> None:
        super().__init__(name="pixelmill-staging", daemon=True)
        self.conn = conn
        self.merge_batch = merge_batch
        self.inserted = 0
        self.error: BaseException | None = None
        self._chunks: queue.Queue[tuple[bytes, bytes, bytes] | None] = queue.Queue(CHUNKS_IN_FLIGHT)
        self._cancelled = threading.Event()
        self._switch_interval = sys.getswitchinterval()

    def start(self) -> None:
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, WRITER_SWITCH_INTERVAL))
        super().start()

    def submit(self, chunk: tuple[bytes, bytes, bytes]) -> None:
        self._raise_error()
        self._chunks.put(chunk)

    def finish(self) -> int:
        self._chunks.put(None)
        self._join()
        self._raise_error()
        return self.inserted

    def cancel(self) -> None:
        if not self.is_alive():
            return
        self._cancelled.set()
        self._chunks.put(None)
        self._join()

    def _join(self) -> None:
        self.join()
        sys.setswitchinterval(self._switch_interval)

    def _raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def run(self) -> None:
        statement = ""
        try:
            with self.conn.cursor() as cursor:
                while (chunk := self._chunks.get()) is not None:
                    if self._cancelled.is_set():
                        continue
                    items, jobs, options = chunk
                    for table, columns, data in (
                        ("staging_items", ITEM_COLUMNS, items),
                        ("staging_jobs", JOB_COLUMNS, jobs),
                        ("staging_job_options", OPTION_COLUMNS, options),
                    ):
                        if not data and table == "staging_job_options":
                            continue  # the usual case: plain jobs only
                        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
                        with cursor.copy(statement) as copy:
                            copy.write(data)
                    statement = self.merge_batch
                    cursor.execute(statement)
                    # The items' merge; then the jobs taken over and the jobs inserted.
                    for _merge_jobs in _MERGES[1:]:
                        cursor.nextset()
                        self.inserted += cursor.rowcount
        except BaseException as exc:  # handed to the producer's thread, which raises it
            if isinstance(exc, psycopg.Error):
                # What the same statement raises through the session (IntegrityError, ...).
                exc = DBAPIError.instance(statement, None, exc, psycopg.Error)
            self.error = exc
            # Keep taking chunks until the producer stops, so it never waits on a full queue.
            while self._chunks.get() is not None:
                pass
