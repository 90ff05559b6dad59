"""What every route needs: the app's state, a database session, the logged-in reviewer, and
the CSRF check of unsafe requests."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from threading import Lock
from typing import Annotated

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from db.models import Reviewer
from pixelmill.errors import PixelmillError
from pixelmill.settings import Settings
from pixelmill.storage import Storage
from review.images import ImageUrls

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class ReviewState:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    urls: ImageUrls
    templates: Jinja2Templates
    # When each run's queue was last synced on demand (a reviewer found it empty).
    last_sync: dict[int, float]
    sync_lock: Lock

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.review_claim_lease_seconds)


class LoginRequired(PixelmillError):
    """No reviewer is logged in: pages redirect to the login form, the API answers 401."""


class Forbidden(PixelmillError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def state(request: Request) -> ReviewState:
    review_state: ReviewState = request.app.state.review
    return review_state


def db(request: Request) -> Iterator[Session]:
    with state(request).sessions() as session:
        yield session


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use, e.g. when the login form is shown)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


async def check_csrf(request: Request) -> None:
    """Refuse an unsafe request that does not carry the session's token, in the
    X-CSRF-Token header (the pages' JavaScript) or the csrf_token form field (forms)."""
    if request.method not in UNSAFE_METHODS:
        return
    expected = request.session.get("csrf")
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not isinstance(expected, str) or not sent or not secrets.compare_digest(expected, sent):
        raise Forbidden("CSRF token missing or wrong: reload the page and try again")


def current_reviewer(request: Request, session: Annotated[Session, Depends(db)]) -> Reviewer:
    reviewer_id = request.session.get("reviewer_id")
    if not isinstance(reviewer_id, int):
        raise LoginRequired
    reviewer = session.get(Reviewer, reviewer_id)
    # A digest of the password hash is in the cookie: changing the password ends old sessions.
    if reviewer is None or request.session.get("pw") != _password_stamp(reviewer):
        request.session.clear()
        raise LoginRequired
    return reviewer


def _password_stamp(reviewer: Reviewer) -> str:
    return hashlib.sha256(reviewer.password_hash.encode()).hexdigest()[:16]


def admin(reviewer: Annotated[Reviewer, Depends(current_reviewer)]) -> Reviewer:
    if not reviewer.is_admin:
        raise Forbidden("this needs an admin reviewer (pixelmill reviewer add NAME --admin)")
    return reviewer


def log_in(request: Request, reviewer: Reviewer) -> None:
    # A fresh session (and CSRF token) at login: nothing set before it carries over.
    request.session.clear()
    request.session["reviewer_id"] = reviewer.id
    request.session["pw"] = _password_stamp(reviewer)
    csrf_token(request)


State = Annotated[ReviewState, Depends(state)]
DB = Annotated[Session, Depends(db)]
CurrentReviewer = Annotated[Reviewer, Depends(current_reviewer)]
Admin = Annotated[Reviewer, Depends(admin)]
