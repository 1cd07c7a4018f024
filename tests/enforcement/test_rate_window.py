"""The storage layout of the `limits` library's Redis moving window, which
``billing/enforcement/lua/authorize.lua`` reads and writes itself (``mirror.rate_window``).

Written by calling the library and reading Redis, so that an upgrade of limits that moves or
reshapes the window fails here rather than letting the hot path count somewhere the library
no longer looks.
"""

from __future__ import annotations

import time
import uuid

import redis
from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from billing.accounts.keys import ApiKey
from billing.core.settings import Settings
from billing.enforcement import mirror


def test_the_moving_window_is_a_list_of_timestamps_newest_first(redis_settings: Settings) -> None:
    assert redis_settings.redis_url is not None
    client = redis.Redis.from_url(redis_settings.redis_url)
    key_id = f"key_{uuid.uuid4().hex}"
    name = f"LIMITS:LIMITER/{key_id}/2/1/minute"
    limiter = MovingWindowRateLimiter(RedisStorage(redis_settings.redis_url))
    item = parse("2 per minute")
    try:
        before = time.time()
        assert limiter.hit(item, key_id)
        assert limiter.hit(item, key_id)
        assert not limiter.hit(item, key_id)
        after = time.time()
        # Where and how big the hot path believes the window is.
        assert mirror.rate_window(ApiKey(id=key_id, rate_limit="2 per minute")) == (name, 2, 60)
        # The only thing the library wrote: a list under that name, expiring with the window,
        # of the allowed hits' timestamps in seconds, newest first, trimmed to the limit.
        assert client.keys(f"*{key_id}*") == [name.encode()]
        assert client.type(name) == b"list"
        assert 0 < client.ttl(name) <= 60
        first, second = (float(stamp) for stamp in client.lrange(name, 0, -1))
        assert after >= first >= second >= before
        # The window is full when its oldest place (index limit - 1) lies within the window,
        # as the script tests it; the library agrees once that place leaves the window.
        client.lset(name, 1, repr(time.time() - 61))
        assert limiter.test(item, key_id)
    finally:
        client.delete(name)
        client.close()
