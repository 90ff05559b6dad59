"""What every route needs: the app's state, a database session, the logged-in reviewer, and
the CSRF check of unsafe requests."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from review.logins import end_login, reviewer_of, start_login
from review.ranked import RunCuts
from review.throttle import LoginThrottle

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
    throttle: LoginThrottle
    # The session cookie is marked Secure (see review.app.secure_cookies).
    secure_cookies: bool
    # Each run's cut line, cached (it averages every prediction of the run).
    cuts: RunCuts = field(default_factory=RunCuts)

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.review_claim_lease_seconds)

    @property
    def reopen_window(self) -> timedelta:
        return timedelta(seconds=self.settings.review_reopen_seconds)

    @property
    def duplicate_similarity(self) -> float:
        return self.settings.duplicate_similarity


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
    # Compared as bytes: compare_digest refuses str with non-ASCII characters, which a
    # forged header or form field may well hold.
    if (
        not isinstance(expected, str)
        or not sent
        or not secrets.compare_digest(expected.encode(), sent.encode("utf-8", "surrogatepass"))
    ):
        raise Forbidden("CSRF token missing or wrong: reload the page and try again")


def current_reviewer(request: Request, session: Annotated[Session, Depends(db)]) -> Reviewer:
    """The reviewer of the cookie's login, while that login lasts on the server (logout and
    a new password end it: see review.logins)."""
    token = request.session.get("login")
    if not isinstance(token, str):
        raise LoginRequired
    reviewer = reviewer_of(session, token)
    if reviewer is None:
        request.session.clear()
        raise LoginRequired
    return reviewer


def admin(reviewer: Annotated[Reviewer, Depends(current_reviewer)]) -> Reviewer:
    if not reviewer.is_admin:
        raise Forbidden("this needs an admin reviewer (pixelmill reviewer add NAME --admin)")
    return reviewer


def log_in(request: Request, session: Session, reviewer: Reviewer) -> None:
    # A fresh session (and CSRF token) at login: nothing set before it carries over.
    request.session.clear()
    lifetime = timedelta(hours=state(request).settings.review_session_hours)
    request.session["login"] = start_login(session, reviewer, lifetime)
    csrf_token(request)


def log_out(request: Request, session: Session) -> None:
    token = request.session.get("login")
    if isinstance(token, str):
        end_login(session, token)
    request.session.clear()


State = Annotated[ReviewState, Depends(state)]
DB = Annotated[Session, Depends(db)]
CurrentReviewer = Annotated[Reviewer, Depends(current_reviewer)]
Admin = Annotated[Reviewer, Depends(admin)]
