"""Failed authentications, counted per credential kind and client address (issue 10, item 7).

Once an address has failed ``AUTH_FAILURE_RATE_LIMIT`` times within the window (a moving window of
the `limits` library), its attempts of that kind are refused with 429 before their credential is
looked at, so that guessing goes no faster than the limit and a right guess past it tells
nothing. Successful authentications are never counted. Each kind (admin, gateway, customer API
key) has a window of its own, so that an operator's script with a stale admin token at the
gateway's address does not lock the gateway out.

The windows live in Redis when there is one (every API process shares them), else in memory. With
Redis unreachable each process counts in its own memory, so the limit holds per process rather
than not at all.
"""

from __future__ import annotations

import logging
import threading
import time

from cachetools import TTLCache
from limits import RateLimitItem
from limits.errors import StorageError
from limits.storage import MemoryStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from billing.core.errors import BillingError

log = logging.getLogger(__name__)

NAMESPACE = "auth-failures"

# How long a process trusts what it last read of an address's window. Every request that sends a
# credential asks; without this, every one of them (authorize's hot path included) would pay a
# Redis round trip. A failure forgets what was read, so the limit is never passed by more than
# the attempts already in flight.
MEMO_SECONDS = 1.0
_UNREAD = -1.0  # not a reset time: the memo holds nothing for the address


class TooManyFailedAuthentications(BillingError):
    """The client address has failed to authenticate too often; its credential is not checked."""

    status = 429
    code = "rate_limit_exceeded"
    type = "requests"

    def __init__(self, message: str, *, retry_after: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class AuthFailures:
    """The windows of failed authentications of one process (shared through ``storage``)."""

    def __init__(self, storage: Storage, limit: RateLimitItem) -> None:
        self.limit = limit
        self._shared = MovingWindowRateLimiter(storage)
        self._local = MovingWindowRateLimiter(MemoryStorage())
        # (kind, address) -> when its window next frees a slot (epoch seconds), or None: not full.
        self._memo: TTLCache[tuple[str, str], float | None] = TTLCache(
            maxsize=10_000, ttl=MEMO_SECONDS
        )
        self._lock = threading.Lock()

    def retry_after(self, kind: str, address: str) -> int | None:
        """Seconds until ``address`` may try a ``kind`` credential again; None: it may now."""
        key = (kind, address)
        with self._lock:
            reset = self._memo.get(key, _UNREAD)
        if reset == _UNREAD:
            reset = self._read(kind, address)
            with self._lock:
                self._memo[key] = reset
        if reset is None:
            return None
        return max(int(reset - time.time()) + 1, 1)

    def check(self, kind: str, address: str) -> None:
        """Raise TooManyFailedAuthentications if ``address`` is over the limit for ``kind``."""
        wait = self.retry_after(kind, address)
        if wait is not None:
            raise TooManyFailedAuthentications(
                "Too many failed authentications from your address. Try again in"
                f" {wait} seconds with a valid credential.",
                retry_after=wait,
                param="Authorization",
            )

    def failed(self, kind: str, address: str) -> None:
        """Count a failed ``kind`` authentication from ``address``."""
        try:
            self._shared.hit(self.limit, NAMESPACE, kind, address)
        except StorageError:
            log.warning("auth failure window unavailable; counted in this process", exc_info=True)
            self._local.hit(self.limit, NAMESPACE, kind, address)
        with self._lock:
            self._memo.pop((kind, address), None)

    def reset(self) -> None:
        """Forget every window and what was read of them (tests)."""
        for limiter in (self._shared, self._local):
            limiter.storage.reset()
        with self._lock:
            self._memo.clear()

    def _read(self, kind: str, address: str) -> float | None:
        """When the window of (kind, address) frees a slot if it is full, else None."""
        try:
            return self._full_until(self._shared, kind, address)
        except StorageError:
            log.warning("auth failure window unavailable; read in this process", exc_info=True)
            return self._full_until(self._local, kind, address)

    def _full_until(
        self, limiter: MovingWindowRateLimiter, kind: str, address: str
    ) -> float | None:
        stats = limiter.get_window_stats(self.limit, NAMESPACE, kind, address)
        return stats.reset_time if stats.remaining <= 0 else None
