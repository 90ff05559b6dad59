"""Times read back from the database: SQLite returns them without a zone (they are UTC)."""

from __future__ import annotations

from datetime import UTC, datetime

from db.models import utcnow


def aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def seconds_until(moment: datetime | None) -> int:
    """Whole seconds from now until ``moment`` (0 when it has passed or is None)."""
    if moment is None:
        return 0
    return max(0, int((aware(moment) - utcnow()).total_seconds()))
