"""Reviewer accounts: argon2id password hashes (argon2-cffi's current defaults, RFC 9106)."""

from __future__ import annotations

import contextlib
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Reviewer
from pixelmill.errors import BadInputError
from review.logins import end_all_logins

_hasher = PasswordHasher()
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
MIN_PASSWORD_LENGTH = 10
# Verified when the name is unknown, so a login takes as long either way (no user probing).
_DUMMY_HASH = _hasher.hash("not a real password, only for timing")


class AccountError(BadInputError):
    pass


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise AccountError(
            f"reviewer name {name!r}: use 1-100 letters, digits, '.', '_', '-' or '@'"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password: at least {MIN_PASSWORD_LENGTH} characters, please")
    return password


def add_reviewer(session: Session, name: str, password: str, *, admin: bool = False) -> Reviewer:
    """Create an account (commits); an existing name is an error."""
    check_name(name)
    check_password(password)
    if session.scalar(select(Reviewer.id).where(Reviewer.name == name)) is not None:
        raise AccountError(f"reviewer {name!r} exists already")
    reviewer = Reviewer(name=name, password_hash=_hasher.hash(password), is_admin=admin)
    session.add(reviewer)
    session.commit()
    return reviewer


def set_password(session: Session, name: str, password: str) -> None:
    """A new password; every open login of the reviewer ends (commits)."""
    reviewer = session.scalar(select(Reviewer).where(Reviewer.name == name))
    if reviewer is None:
        raise AccountError(f"no reviewer named {name!r}")
    reviewer.password_hash = _hasher.hash(check_password(password))
    end_all_logins(session, reviewer.id)
    session.commit()


def authenticate(session: Session, name: str, password: str) -> Reviewer | None:
    """The reviewer if the password is right; None otherwise. Re-hashes an outdated hash."""
    # A name no account can have (NUL bytes, 10,000 characters, ...) is not looked up: it is
    # unknown, and checked against the dummy hash like any other unknown name.
    reviewer = None
    if NAME_PATTERN.fullmatch(name):
        reviewer = session.scalar(select(Reviewer).where(Reviewer.name == name))
    # Bytes: a JSON or form string may hold lone surrogates, which plain UTF-8 refuses.
    secret = password.encode("utf-8", "surrogatepass")
    if reviewer is None:
        with contextlib.suppress(VerificationError):
            _hasher.verify(_DUMMY_HASH, secret)
        return None
    try:
        _hasher.verify(reviewer.password_hash, secret)
    except (VerificationError, InvalidHashError):
        return None
    if _hasher.check_needs_rehash(reviewer.password_hash):
        reviewer.password_hash = _hasher.hash(secret)
        session.commit()
    return reviewer
