"""The signature of a webhook delivery, and how a receiver checks it.

Header ``Pixelmill-Signature: t=TIMESTAMP,v1=HEX``: TIMESTAMP is the Unix time (seconds) of
the attempt, HEX the lowercase hex HMAC-SHA256, keyed with PIXELMILL_WEBHOOK_SECRET, of the
bytes ``TIMESTAMP + "." + BODY`` (the exact request body, before any parsing). The timestamp
is signed with the body, so a captured request replayed later than the receiver's tolerance
is refused, and it cannot be changed without the secret.

A receiver recomputes the HMAC over the raw body, compares in constant time and checks the
timestamp is recent (:func:`verify_signature` does all three; any language's HMAC does the
same in a few lines).
"""

from __future__ import annotations

import hashlib
import hmac
import time

from pixelmill.errors import BadInputError

SIGNATURE_HEADER = "Pixelmill-Signature"
EVENT_ID_HEADER = "Pixelmill-Event-Id"
EVENT_TYPE_HEADER = "Pixelmill-Event-Type"
# How old a signed timestamp a receiver accepts by default (seconds), either way.
DEFAULT_TOLERANCE_SECONDS = 300
SCHEME = "v1"


class SignatureError(BadInputError):
    """A delivery whose signature header is missing, malformed, wrong or too old."""


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``TIMESTAMP.BODY`` under the secret."""
    signed = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret, signed, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, body: bytes, timestamp: int) -> str:
    """The value of the Pixelmill-Signature header of a request sent at ``timestamp``."""
    return f"t={timestamp},{SCHEME}={signature(secret, body, timestamp)}"


def _parse(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == SCHEME and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError(f"{SIGNATURE_HEADER} {header!r}: expected 't=TIMESTAMP,v1=HEX'")
    return timestamp, signatures


def verify_signature(
    secret: bytes,
    body: bytes,
    header: str,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> int:
    """Check a delivery as a receiver would; returns its signed timestamp. Raises
    SignatureError if no ``v1`` signature matches the body or the timestamp is further than
    ``tolerance_seconds`` from ``now`` (default: the current time)."""
    timestamp, signatures = _parse(header)
    expected = signature(secret, body, timestamp)
    if not any(hmac.compare_digest(expected, given) for given in signatures):
        raise SignatureError(f"{SIGNATURE_HEADER}: the signature does not match the body")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise SignatureError(
            f"{SIGNATURE_HEADER}: signed at {timestamp}, more than {tolerance_seconds:g} s "
            f"from now ({current:.0f}): refused as a possible replay"
        )
    return timestamp
