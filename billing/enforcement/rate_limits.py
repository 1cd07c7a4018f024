"""Per-key rate limits: the `limits` library's moving window, and the remainder a gateway shows.

The Redis script of the hot path counts in the library's own list for Redis
(``billing.enforcement.mirror.rate_window``); ``RateLimits`` is the library itself, over Redis
(for ``Retry-After``) or over memory (where there is no Redis, or it is down).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse
from limits.storage import Storage
from limits.strategies import MovingWindowRateLimiter


@lru_cache(maxsize=1024)
def rate(text: str) -> RateLimitItem:
    """The parsed rate limit ``text`` (``1 per 10 seconds``, ``60/minute``)."""
    return parse(text)


@dataclass(frozen=True)
class RateWindow:
    """A key's rate limit as a gateway shows it (``x-ratelimit-*``): requests per window,
    those left now, and whole seconds until the oldest counted request leaves the window (the
    window's length when none is counted)."""

    limit: int
    remaining: int
    reset_seconds: int

    @classmethod
    def of(cls, text: str, *, used: int, oldest: float | None, now: float) -> RateWindow:
        """The window of the limit ``text`` holding ``used`` requests, the oldest at ``oldest``
        (Unix seconds), as the library computes its window stats."""
        item = rate(text)
        reset = (now if oldest is None else oldest) + item.get_expiry()
        return cls(item.amount, max(0, item.amount - used), max(0, math.ceil(reset - now)))


class RateLimits:
    """Per-key rate limits (the `limits` library's moving window) in one storage."""

    def __init__(self, storage: Storage) -> None:
        self._limiter = MovingWindowRateLimiter(storage)

    def hit(self, rate_limit: str, key_id: str) -> bool:
        """Count a request; False (and nothing counted) if the limit is reached."""
        return self._limiter.hit(rate(rate_limit), key_id)

    def test(self, rate_limit: str, key_id: str) -> bool:
        """Whether a request would be allowed now, counting nothing."""
        return self._limiter.test(rate(rate_limit), key_id)

    def retry_after(self, rate_limit: str, key_id: str) -> int:
        """Whole seconds until the next request may be allowed (at least 1)."""
        reset = self._limiter.get_window_stats(rate(rate_limit), key_id).reset_time
        return max(1, math.ceil(reset - time.time()))

    def window(self, rate_limit: str, key_id: str) -> RateWindow:
        """The key's window now, counting nothing."""
        item = rate(rate_limit)
        stats = self._limiter.get_window_stats(item, key_id)
        return RateWindow(
            item.amount, max(0, stats.remaining), max(0, math.ceil(stats.reset_time - time.time()))
        )
