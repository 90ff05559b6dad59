"""Failed logins limited per account and per client address (the ``limits`` library, moving
windows): in the process's memory by default, in Redis when PIXELMILL_REVIEW_RATE_LIMIT_URL
names one, so every app process shares the counts.

An attempt on an account takes one of its allowance before the password is checked, so
parallel guesses cannot slip past the limit; a successful login gives the allowance back. The
address allowance counts failures only."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.errors import ConfigurationError, StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from pixelmill.errors import BadInputError, InfrastructureError
from pixelmill.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "pixelmill-review-login"


class ThrottleSettingError(BadInputError):
    pass


class ThrottleUnavailable(InfrastructureError):
    """The store of the counts (Redis) cannot be reached: logins wait rather than go
    unlimited."""


class Throttled(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed logins: try again in {retry_after} s")
        self.retry_after = retry_after


def _account_key(name: str) -> str:
    # Hashed: any string may be typed as a name, and it becomes part of a storage key.
    return "account:" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class LoginThrottle:
    def __init__(self, settings: Settings) -> None:
        url = settings.review_rate_limit_url or "memory://"
        try:
            storage = storage_from_string(url, wrap_exceptions=True)
        except (ConfigurationError, ValueError) as exc:
            raise ThrottleSettingError(f"PIXELMILL_REVIEW_RATE_LIMIT_URL {url!r}: {exc}") from exc
        self.limiter = MovingWindowRateLimiter(storage)
        window = settings.review_login_window_seconds
        self.per_account = RateLimitItemPerSecond(
            settings.review_login_failures_per_account, window, namespace=NAMESPACE
        )
        self.per_address = RateLimitItemPerSecond(
            settings.review_login_failures_per_address, window, namespace=NAMESPACE
        )

    def begin(self, name: str, address: str) -> None:
        """Before checking a password: raise :class:`Throttled` if the address or the
        account has no attempts left, else take one of the account's."""
        address_key = "address:" + address
        try:
            if not self.limiter.test(self.per_address, address_key):
                raise Throttled(self._wait(self.per_address, address_key))
            account_key = _account_key(name)
            if not self.limiter.hit(self.per_account, account_key):
                raise Throttled(self._wait(self.per_account, account_key))
        except StorageError as exc:
            log.error("login limiter store unreachable: %s", exc)
            raise ThrottleUnavailable("the login limiter's store is unreachable") from exc

    def failed(self, address: str) -> None:
        self._guarded(lambda: self.limiter.hit(self.per_address, "address:" + address))

    def succeeded(self, name: str) -> None:
        self._guarded(lambda: self.limiter.clear(self.per_account, _account_key(name)))

    def _wait(self, item: RateLimitItem, key: str) -> int:
        reset = self.limiter.get_window_stats(item, key).reset_time
        return max(1, math.ceil(reset - time.time()))

    def _guarded(self, action: Callable[[], object]) -> None:
        try:
            action()
        except StorageError as exc:
            log.error("login limiter store unreachable: %s", exc)
