"""INSERT ... ON CONFLICT DO NOTHING on Postgres and SQLite alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base


def insert_ignoring_conflicts_stmt(session: Session, model: type[Base]) -> Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(model).on_conflict_do_nothing()
    raise NotImplementedError(f"database {dialect!r} is not supported (use Postgres or SQLite)")


def insert_ignoring_conflicts(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]]
) -> None:
    if rows:
        session.execute(insert_ignoring_conflicts_stmt(session, model), list(rows))
