"""The Redis mirror of key states, for the gateway's hot path.

Redis may lose everything at any moment (DESIGN invariant 6), so the mirror is only ever a copy:
PostgreSQL's ``api_keys`` is the truth and ``key_state_changes`` the feed that keeps the copy
fresh. The mirror remembers the last change it applied; when that marker is missing (a new or
flushed Redis) the whole mirror is rebuilt from PostgreSQL. Applying a change writes the key's
*current* state, so applying one twice, or out of order, is harmless.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import redis
from limits import parse as parse_rate_limit
from limits.storage import RedisStorage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.accounts.key_states import ENFORCEMENT, KeyState
from billing.accounts.keys import CHANGE_COMMIT_LAG, ApiKey, KeyStateChange

CURSOR = "billing:mirror:cursor"
KEY_PREFIX = "billing:key:"
HASH_PREFIX = "billing:kh:"
ALL_MODELS = "*"
# Redis scripts compute in doubles, exact for integers below 2**53 nano-dollars (about nine
# million dollars); larger amounts are copied as this limit, which only ever refuses more.
EXACT_LIMIT = 2**53 - 1


def key_name(key_id: str) -> str:
    """The Redis hash holding one key's mirrored state."""
    return KEY_PREFIX + key_id


RATE_FIELDS = ("rate_key", "rate_amount", "rate_expiry")


def rate_window(key: ApiKey) -> tuple[str, int | str, int | str]:
    """Where the `limits` library's Redis storage keeps this key's moving window, its size and
    its length in seconds; empty strings for a key without a rate limit."""
    if key.rate_limit is None:
        return "", "", ""
    item = parse_rate_limit(key.rate_limit)
    return f"{RedisStorage.PREFIX}:{item.key_for(key.id)}", item.amount, item.get_expiry()


def hash_name(key_hash: str) -> str:
    """The Redis string naming the key whose secret has this keyed hash."""
    return HASH_PREFIX + key_hash


def _write(pipe: redis.client.Pipeline, keys: Iterable[ApiKey]) -> None:
    for key in keys:
        state = KeyState(key.state)
        expires = key.expires_at
        cap = key.monthly_cap_nanos
        pipe.hset(
            key_name(key.id),
            mapping={
                "state": state.value,
                "http_status": ENFORCEMENT[state].http_status,
                "account_id": key.account_id,
                "key_hash": key.key_hash,
                # What authorize enforces besides the state (billing.enforcement.hotpath).
                "expires_ms": "" if expires is None else int(expires.timestamp() * 1000),
                "cap": "" if cap is None else min(cap, EXACT_LIMIT),
                "models": ALL_MODELS
                if key.allowed_models is None
                else ",".join(key.allowed_models),
                "rate_limit": key.rate_limit or "",
                **dict(zip(RATE_FIELDS, rate_window(key), strict=True)),
            },
        )
        pipe.set(hash_name(key.key_hash), key.id)


def rebuild(session: Session, client: redis.Redis) -> int:
    """Write every key's state to Redis and set the cursor; returns the number of keys."""
    last_change = session.scalar(select(func.max(KeyStateChange.id))) or 0
    count = 0
    pipe = client.pipeline(transaction=False)
    for key in session.scalars(select(ApiKey).execution_options(yield_per=1000)):
        _write(pipe, [key])
        count += 1
        if count % 1000 == 0:
            pipe.execute()
    pipe.set(CURSOR, last_change)
    pipe.execute()
    return count


def write(client: redis.Redis, keys: Iterable[ApiKey]) -> None:
    """Write these keys' states, as loaded, to the mirror."""
    pipe = client.pipeline(transaction=False)
    _write(pipe, keys)
    pipe.execute()


def publish(session: Session, client: redis.Redis, key_ids: Iterable[str]) -> None:
    """Write the committed states of the keys with these ids to the mirror."""
    write(client, session.scalars(select(ApiKey).where(ApiKey.id.in_(set(key_ids)))))


def sync(session: Session, client: redis.Redis, *, now: dt.datetime) -> int:
    """Bring the mirror up to date with PostgreSQL; returns how many keys were written.

    Change ids are assigned at insert, not at commit, so a change may become visible after a
    higher id did. The cursor therefore only moves past changes older than ``CHANGE_COMMIT_LAG``;
    newer ones are applied again next time, which is harmless.
    """
    cursor = client.get(CURSOR)
    if cursor is None:
        return rebuild(session, client)
    changes = session.execute(
        select(KeyStateChange.id, KeyStateChange.key_id, KeyStateChange.created_at)
        .where(KeyStateChange.id > int(cursor))
        .order_by(KeyStateChange.id)
    ).all()
    if not changes:
        return 0
    key_ids = {key_id for _, key_id, _ in changes}
    pipe = client.pipeline(transaction=False)
    _write(pipe, session.scalars(select(ApiKey).where(ApiKey.id.in_(key_ids))))
    settled = [
        change_id for change_id, _, created_at in changes if created_at <= now - CHANGE_COMMIT_LAG
    ]
    if settled:
        pipe.set(CURSOR, settled[-1])
    pipe.execute()
    return len(key_ids)
