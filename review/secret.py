"""The key that signs session cookies."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pixelmill.errors import BadInputError
from pixelmill.settings import Settings

MIN_LENGTH = 32
SECRET_FILE = "review_secret_key"


class SecretKeyError(BadInputError):
    pass


def secret_key(settings: Settings) -> str:
    """PIXELMILL_REVIEW_SECRET_KEY; on the embedded setup (no database URL) a key generated
    once and kept in the data folder, so `pixelmill review` works on a fresh machine and
    sessions survive restarts. With a real database it must be set: every process serving
    the app needs the same key."""
    if settings.review_secret_key is not None:
        key = settings.review_secret_key.get_secret_value()
        if len(key) < MIN_LENGTH:
            raise SecretKeyError(
                f"PIXELMILL_REVIEW_SECRET_KEY: at least {MIN_LENGTH} characters, please "
                f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        return key
    if settings.database_url:
        raise SecretKeyError(
            "PIXELMILL_REVIEW_SECRET_KEY is required when PIXELMILL_DATABASE_URL is set "
            "(every review process must share it); generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    return _embedded_key(settings.data_dir / SECRET_FILE)


def _embedded_key(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole to a private file, then linked into place: a process starting at the
        # same moment either sees no file or the complete key, and the first link wins.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
