"""Finding a run the way a person names it: by name, by id, or the latest."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Run


def find_run(session: Session, name_or_id: str | None) -> Run | None:
    """The run named ``name_or_id``, else the run with that id, else None; the latest run
    when ``name_or_id`` is None."""
    if name_or_id is None:
        return session.scalars(select(Run).order_by(Run.id.desc()).limit(1)).one_or_none()
    run = session.scalars(select(Run).where(Run.name == name_or_id)).one_or_none()
    if run is None and name_or_id.isdigit():
        run = session.get(Run, int(name_or_id))
    return run
