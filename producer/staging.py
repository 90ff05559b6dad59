"""Staging tables: where a run's items and jobs wait until the whole catalogue is accepted.

Rows stream into session-private temporary tables (Postgres ``COPY``; batched inserts on
SQLite). :meth:`Staging.merge` then moves them into the real tables with two set-based
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` statements, which is where deduplication
against earlier runs happens, inside the database.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.orm import Session

from db.models import utcnow

FLUSH_EVERY = 5_000

ITEM_COLUMNS = ("external_key", "content_hash", "fields")
JOB_COLUMNS = (
    "ord",
    "item_key",
    "item_hash",
    "template",
    "variant",
    "prompt",
    "negative_prompt",
    "model",
    "scheduler",
    "steps",
    "guidance",
    "width",
    "height",
    "seeds",
    "dedupe_key",
)

_TABLES = {
    "staging_items": "external_key TEXT NOT NULL, content_hash TEXT NOT NULL, fields {json}",
    "staging_jobs": (
        "ord BIGINT NOT NULL, item_key TEXT NOT NULL, item_hash TEXT NOT NULL, "
        "template TEXT NOT NULL, variant TEXT NOT NULL, prompt TEXT NOT NULL, "
        "negative_prompt TEXT NOT NULL, model TEXT NOT NULL, scheduler TEXT, "
        "steps INTEGER NOT NULL, guidance {float} NOT NULL, width INTEGER NOT NULL, "
        "height INTEGER NOT NULL, seeds {json} NOT NULL, dedupe_key TEXT NOT NULL"
    ),
}


class Staging:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.dialect = session.get_bind().dialect.name
        self.items: list[tuple[Any, ...]] = []
        self.jobs: list[tuple[Any, ...]] = []
        self.count = 0
        postgres = self.dialect == "postgresql"
        schema = "pg_temp" if postgres else "temp"
        for name, columns in _TABLES.items():
            self.session.execute(text(f"DROP TABLE IF EXISTS {schema}.{name}"))
            ddl = columns.format(
                json="JSONB" if postgres else "TEXT",
                float="DOUBLE PRECISION" if postgres else "REAL",
            )
            self.session.execute(text(f"CREATE TEMPORARY TABLE {name} ({ddl})"))

    def add(self, item: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        self.items.append(
            (item["key"], item["hash"], json.dumps(item["fields"], ensure_ascii=False))
        )
        for job in jobs:
            self.count += 1
            self.jobs.append(
                (
                    self.count,
                    job["item_key"],
                    item["hash"],
                    job["template"],
                    job["variant"],
                    job["prompt"],
                    job["negative_prompt"],
                    job["model"],
                    job["scheduler"],
                    job["steps"],
                    job["guidance"],
                    job["width"],
                    job["height"],
                    "[" + ",".join(map(str, job["seeds"])) + "]",  # JSON, without json.dumps
                    job["dedupe_key"],
                )
            )
        if len(self.jobs) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        self._write("staging_items", ITEM_COLUMNS, self.items)
        self._write("staging_jobs", JOB_COLUMNS, self.jobs)
        self.items.clear()
        self.jobs.clear()

    def _write(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self.dialect == "postgresql":
            # COPY is the fastest way into Postgres; it runs on this session's connection, so
            # inside its transaction.
            raw = self.session.connection().connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor:
                sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(sql) as copy:
                    for row in rows:
                        copy.write_row(row)
            return
        placeholders = ", ".join(f":{c}" for c in columns)
        self.session.execute(
            text(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"),
            [dict(zip(columns, row, strict=True)) for row in rows],
        )

    def merge(self, *, run_id: int, source: str) -> int:
        """Move staged rows into the real tables; returns how many jobs were new."""
        now = bindparam("now", utcnow(), type_=DateTime(timezone=True))
        # "WHERE true": SQLite needs it to parse INSERT ... SELECT ... ON CONFLICT.
        self.session.execute(
            text(
                "INSERT INTO catalogue_items (source, external_key, fields, content_hash, "
                "created_at) "
                "SELECT :source, external_key, fields, content_hash, :now FROM staging_items "
                "WHERE true ON CONFLICT (source, external_key, content_hash) DO NOTHING"
            ).bindparams(now),
            {"source": source},
        )
        result = self.session.execute(
            text(
                "INSERT INTO jobs (run_id, item_id, template, variant, prompt, negative_prompt, "
                "model, scheduler, steps, guidance, width, height, seeds, status, attempts, "
                "dedupe_key, created_at) "
                "SELECT :run_id, ci.id, s.template, s.variant, s.prompt, s.negative_prompt, "
                "s.model, s.scheduler, s.steps, s.guidance, s.width, s.height, s.seeds, "
                "'pending', 0, s.dedupe_key, :now "
                "FROM staging_jobs s JOIN catalogue_items ci ON ci.source = :source "
                "AND ci.external_key = s.item_key AND ci.content_hash = s.item_hash "
                "WHERE true ORDER BY s.ord "
                "ON CONFLICT (dedupe_key) DO NOTHING"
            ).bindparams(now),
            {"run_id": run_id, "source": source},
        )
        inserted = int(result.rowcount)  # type: ignore[attr-defined]
        for name in _TABLES:
            self.session.execute(text(f"DROP TABLE {name}"))
        return inserted
