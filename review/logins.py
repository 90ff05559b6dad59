"""Logins kept on the server (``review_sessions``): the signed cookie holds a random token
whose hash names the row, so a login ends when its row is deleted (logout, a new password),
whatever copies of the cookie exist."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import Reviewer, utcnow
from db.review_sessions import ReviewSession


def _row_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def start_login(session: Session, reviewer: Reviewer, lifetime: timedelta) -> str:
    """Record a new login of the reviewer and return its token (for the cookie). Expired
    logins (anyone's: the index on expires_at finds them) are swept at the same time.
    Commits."""
    now = utcnow()
    session.execute(delete(ReviewSession).where(ReviewSession.expires_at <= now))
    token = secrets.token_urlsafe(32)
    session.add(
        ReviewSession(
            id=_row_id(token), reviewer_id=reviewer.id, created_at=now, expires_at=now + lifetime
        )
    )
    session.commit()
    return token


def reviewer_of(session: Session, token: str) -> Reviewer | None:
    """The reviewer whose unexpired login the token is; None for an ended or unknown one."""
    return session.scalar(
        select(Reviewer)
        .join(ReviewSession, ReviewSession.reviewer_id == Reviewer.id)
        .where(ReviewSession.id == _row_id(token), ReviewSession.expires_at > utcnow())
    )


def end_login(session: Session, token: str) -> None:
    """Log out: the token stops working, in every copy of the cookie. Commits."""
    session.execute(delete(ReviewSession).where(ReviewSession.id == _row_id(token)))
    session.commit()


def end_all_logins(session: Session, reviewer_id: int) -> int:
    """End every login of the reviewer (a new password); returns how many. The caller
    commits."""
    result = session.execute(delete(ReviewSession).where(ReviewSession.reviewer_id == reviewer_id))
    return int(result.rowcount)  # type: ignore[attr-defined]
