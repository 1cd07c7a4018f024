"""Secrets we hand out (API keys, admin and gateway tokens) and the keyed hashes we store.

A secret is shown once, at creation. Only ``HMAC-SHA256(server secret, secret)`` is stored, so
a leaked database does not leak usable keys, and a lookup is one indexed equality query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import threading
import time
import uuid

# In ASCII order, so that ids (whose leading digits encode the time) sort in creation order.
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
SECRET_LENGTH = 48


def random_base62(length: int) -> str:
    """``length`` characters drawn uniformly from [0-9A-Za-z] by the OS CSPRNG."""
    # One draw below 62**length, not one per character: ids are made on hot paths.
    return _base62(secrets.randbelow(62**length), length)


def new_secret(prefix: str) -> str:
    """A fresh secret such as ``sk-`` followed by 48 base62 characters."""
    return prefix + random_base62(SECRET_LENGTH)


def _base62(number: int, width: int) -> str:
    digits = ""
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits = BASE62[digit] + digits
    return digits


_clock_lock = threading.Lock()
_last_tick = 0


def new_id(prefix: str) -> str:
    """A public id such as ``acct_`` + 22 base62 characters, sorting in creation order.

    Eight characters of creation millisecond and three of sequence within it come first, so
    ordering by id is ordering by creation time (strictly, within one process): lists
    paginate on the primary key alone. Eleven random characters follow.
    """
    global _last_tick
    with _clock_lock:
        # 62**3 ticks per millisecond; never backwards, even if the wall clock is.
        _last_tick = max(_last_tick + 1, (time.time_ns() // 1_000_000) * 62**3)
        tick = _last_tick
    return f"{prefix}_{_base62(tick, 11)}{random_base62(11)}"


def keyed_hash(key: bytes, secret: str) -> str:
    """The hex HMAC-SHA256 of ``secret`` under the server ``key``: what we store."""
    return hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()


def mask(secret: str) -> tuple[str, str]:
    """The display prefix and last four characters kept beside a hash (``sk-AbCd``, ``wxyz``)."""
    head = secret.find("-") + 1 or secret.find("_") + 1
    return secret[: head + 4], secret[-4:]


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits; unique without
    coordination, and sorting in creation order to the millisecond."""
    milliseconds = time.time_ns() // 1_000_000
    value = (milliseconds & (2**48 - 1)) << 80 | secrets.randbits(80)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC 9562 variant
    return uuid.UUID(int=value)
