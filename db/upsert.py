"""INSERT ... ON CONFLICT DO NOTHING / DO UPDATE on Postgres and SQLite alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base


def _dialect(session: Session | str) -> Any:
    """The dialect module whose ``insert`` has ON CONFLICT, for a session or a dialect name."""
    dialect = session if isinstance(session, str) else session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql
    if dialect == "sqlite":
        return sqlite
    raise NotImplementedError(f"database {dialect!r} is not supported (use Postgres or SQLite)")


def insert_ignoring_conflicts_stmt(session: Session | str, model: type[Base]) -> Insert:
    result: Insert = _dialect(session).insert(model).on_conflict_do_nothing()
    return result


def upsert(session: Session, model: type[Base], values: dict[str, Any], key: list[str]) -> None:
    """Insert ``values``, or update the row whose ``key`` columns match with the rest of them:
    one statement, so two sessions doing it at once do not collide on the key."""
    statement = _dialect(session).insert(model).values(values)
    updates = {column: value for column, value in values.items() if column not in key}
    session.execute(statement.on_conflict_do_update(index_elements=key, set_=updates))


def insert_ignoring_conflicts(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]]
) -> None:
    if rows:
        session.execute(insert_ignoring_conflicts_stmt(session, model), list(rows))


def upsert_many(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]], key: list[str]
) -> None:
    """:func:`upsert` of many rows (all with the same columns) in one statement."""
    if not rows:
        return
    statement = _dialect(session).insert(model).values(list(rows))
    updates = {column: statement.excluded[column] for column in rows[0] if column not in key}
    session.execute(statement.on_conflict_do_update(index_elements=key, set_=updates))
