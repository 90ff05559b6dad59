"""What the database can store: string column lengths and storable text.

Postgres refuses a value longer than its column, a NUL character in text or jsonb, and (as any
text encoding does) a lone UTF-16 surrogate. One such value in a produce would abort the whole
catalogue's transaction, so the producer checks values against these first and reports the
row, the template or the command-line option it came from.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String


def string_length(column: Any) -> int:
    """The length of a ``String(n)`` column of the schema, e.g. ``Job.__table__.c.variant``."""
    column_type = column.type
    assert isinstance(column_type, String) and column_type.length is not None
    return column_type.length


def unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored (None when it can): "contains a NUL character ...", or
    "holds a lone UTF-16 surrogate ..." (JSON's "\\ud800" escape)."""
    if "\0" in text:
        return "contains a NUL character, which the database cannot store"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"holds a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}), not text"
    return None
