"""Review app logins kept on the server: the session cookie carries only a random token, and
a login is valid while its row exists, so logging out or a new password ends it everywhere,
copies of the cookie included."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models import Base, utcnow


class ReviewSession(Base):
    """One login. ``id`` is the SHA-256 (hex) of the cookie's token, so the table alone lets
    nobody in."""

    __tablename__ = "review_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewer_id: Mapped[int] = mapped_column(
        ForeignKey("reviewers.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
