"""The state table (``billing.accounts.key_states``) is the one statement of key-state
precedence: ``derive_state`` walks its key-state rows, and both places authorize can run, the
Redis script (``billing/enforcement/lua/authorize.lua``) and PostgreSQL
(``billing.enforcement.postgres``), answer as it says for every row and every pair of rows,
however each row comes to apply."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from limits.storage import MemoryStorage
from sqlalchemy.orm import Session

from billing.accounts import rollups
from billing.accounts.accounts import Account
from billing.accounts.key_states import ENFORCEMENT, STATE_TABLE, KeyState, RequestRefusal, Row
from billing.accounts.keys import ApiKey, derive_state
from billing.accounts.rollups import KeyMonthSpend
from billing.catalog.pricing import HoldTerms
from billing.core.db import utcnow
from billing.core.effects import AccountSnapshot
from billing.core.settings import Settings
from billing.enforcement import mirror
from billing.enforcement.authorize import Authorizer, AuthorizeRequest, Refused
from billing.enforcement.hotpath import HoldRequest, HotPath, Verdict
from billing.enforcement.postgres import PostgresHolds
from billing.enforcement.rate_limits import RateLimits

AMOUNT = 100  # the output tokens each authorize asks for, at a nano-dollar each
CAP = 1000


@dataclass
class Scenario:
    """A key and its account, as the facts of a few rows make them."""

    state: KeyState = KeyState.ACTIVE
    expired: bool = False
    balance: int = 10_000
    held: int = 0
    cap: int | None = None
    spend: int = 0
    key_held: int = 0
    output_tokens: int = AMOUNT
    rows: set[Row] = field(default_factory=set)


def _stored(state: KeyState) -> tuple[str, dict[str, object]]:
    # A stored quota state comes with a cap: the state is only ever derived for a capped key.
    return "stored", {
        "state": state,
        **({"cap": CAP} if state is KeyState.MONTHLY_QUOTA_EXCEEDED else {}),
    }


# Every way a row can apply to a key that Redis and PostgreSQL both see: its stored state, or
# the facts authorize reads itself (the clock, the balance and holds, the month's spend).
WAYS: dict[Row, list[tuple[str, dict[str, object]]]] = {
    KeyState.REVOKED: [_stored(KeyState.REVOKED)],
    KeyState.DISABLED: [_stored(KeyState.DISABLED)],
    KeyState.EXPIRED: [_stored(KeyState.EXPIRED), ("clock", {"expired": True})],
    KeyState.SUSPENDED: [_stored(KeyState.SUSPENDED)],
    KeyState.INSUFFICIENT_BALANCE: [
        _stored(KeyState.INSUFFICIENT_BALANCE),
        ("spent", {"balance": 0}),
        ("held", {"balance": 1000, "held": 1000}),
    ],
    # All or nothing (the clipped hold is tested in test_clipping): more than the balance.
    RequestRefusal.HOLD_EXCEEDS_AVAILABLE: [("asks too much", {"output_tokens": 20_000})],
    KeyState.MONTHLY_QUOTA_EXCEEDED: [
        _stored(KeyState.MONTHLY_QUOTA_EXCEEDED),
        ("spent", {"cap": CAP, "spend": CAP}),
        # The key's own holds (the account's are left to the rows above).
        ("held", {"cap": CAP, "key_held": 950}),
    ],
}
assert set(WAYS) | {KeyState.ACTIVE} == {row.state for row in STATE_TABLE}


def _cases() -> Iterator[object]:
    yield pytest.param((), id="active")
    ways = [(state, way) for state in WAYS for way in WAYS[state]]
    for state, (how, _) in ways:
        yield pytest.param(((state, how),), id=f"{state}:{how}")
    for (first, (how1, _)), (second, (how2, _)) in itertools.combinations(ways, 2):
        if first is not second and not (how1 == how2 == "stored"):  # one stored state a key
            yield pytest.param(
                ((first, how1), (second, how2)), id=f"{first}:{how1}+{second}:{how2}"
            )


CASES = list(_cases())


def scenario(conditions: tuple[tuple[Row, str], ...]) -> Scenario:
    built = Scenario()
    for state, how in conditions:
        for key, value in dict(WAYS[state])[how].items():
            setattr(built, key, value)
        built.rows.add(state)
    return built


def expected(built: Scenario) -> str:
    """The verdict the table calls for: the first of the rows that apply wins."""
    first = next((row.state for row in STATE_TABLE if row.state in built.rows), KeyState.ACTIVE)
    return "checked" if first is KeyState.ACTIVE else first.value  # 'checked': key only


def build(built: Scenario, now: dt.datetime) -> tuple[Account, ApiKey]:
    account = Account(
        id=f"acct_{uuid.uuid4().hex}",
        name="table",
        balance_nanos=built.balance,
        held_nanos=built.held,
        balance_version=1,
        created_at=now,
    )
    key = ApiKey(
        id=f"key_{uuid.uuid4().hex}",
        account_id=account.id,
        name="table",
        key_hash=uuid.uuid4().hex,
        display_prefix="sk-table",
        last4="last",
        state=built.state,
        rate_limit=None,
        monthly_cap_nanos=built.cap,
        held_nanos=built.key_held,
        allowed_models=None,
        expires_at=now - dt.timedelta(seconds=1) if built.expired else None,
        created_at=now - dt.timedelta(days=1),
    )
    return account, key


def hold(key: ApiKey, built: Scenario, now: dt.datetime) -> HoldRequest:
    tokens = built.output_tokens
    return HoldRequest(
        key_hash=key.key_hash,
        model_id=None,
        request_id=f"req-{uuid.uuid4()}",
        hold_id=f"hold_{uuid.uuid4().hex}",
        now=now,
        expires_at=now + dt.timedelta(minutes=10),
        terms=HoldTerms(0, 1_000_000, tokens, tokens),
    )


@pytest.fixture(scope="module")
def client(redis_settings: Settings) -> Iterator[redis.Redis]:
    assert redis_settings.redis_url is not None
    connection = redis.Redis.from_url(redis_settings.redis_url)
    yield connection
    connection.close()


@pytest.mark.parametrize("conditions", CASES)
def test_the_redis_script_answers_as_the_table(
    client: redis.Redis, conditions: tuple[tuple[Row, str], ...]
) -> None:
    built, now = scenario(conditions), utcnow()
    account, key = build(built, now)
    hotpath = HotPath(client)
    names = [mirror.key_name(key.id), mirror.hash_name(key.key_hash), f"billing:acct:{account.id}"]
    try:
        mirror.write(client, [key])
        spend = {key.id: (rollups.month_key(now), built.spend)} if built.cap is not None else {}
        hotpath.publish({account.id: AccountSnapshot(1, built.balance, spend)}, [])
        client.hset(names[2], mapping={"held": built.held, f"kheld:{key.id}": built.key_held})
        assert hotpath.authorize(hold(key, built, now)).verdict == expected(built)
    finally:
        client.delete(*names)


@pytest.mark.parametrize("conditions", CASES)
def test_postgresql_answers_as_the_table(
    db: Session, conditions: tuple[tuple[Row, str], ...]
) -> None:
    built, now = scenario(conditions), utcnow()
    account, key = build(built, now)
    db.add(account)
    db.flush()
    db.add(key)
    db.flush()
    if built.spend:
        db.add(
            KeyMonthSpend(key_id=key.id, month=rollups.month_start(now), spend_nanos=built.spend)
        )
        db.flush()
    holds = PostgresHolds(db, RateLimits(MemoryStorage()))
    assert holds.authorize(hold(key, built, now)).verdict == expected(built)


# The facts derive_state reads, one per row: set on a capped key with money left.
SETTLED_FACTS: dict[KeyState, str] = {
    KeyState.REVOKED: "revoked_at",
    KeyState.DISABLED: "disabled_at",
    KeyState.EXPIRED: "expires_at",
    KeyState.SUSPENDED: "suspended_at",
    KeyState.INSUFFICIENT_BALANCE: "balance_nanos",
    KeyState.MONTHLY_QUOTA_EXCEEDED: "month_spend",
}


@pytest.mark.parametrize(
    "rows",
    [(), *((state,) for state in SETTLED_FACTS), *itertools.combinations(SETTLED_FACTS, 2)],
    ids=lambda rows: "+".join(rows) or "active",
)
def test_derive_state_takes_the_first_row_the_facts_call_for(rows: tuple[KeyState, ...]) -> None:
    now = utcnow()
    account, key = build(Scenario(cap=CAP), now)
    spend = CAP - 1  # a spend just short of the cap, like a balance of one nano-dollar, is fine
    account.balance_nanos = 1
    for fact in (SETTLED_FACTS[state] for state in rows):
        if fact == "balance_nanos":
            account.balance_nanos = 0
        elif fact == "month_spend":
            spend = CAP
        else:  # revoked, disabled, suspended or expired as of now
            setattr(key, fact, now)
    first = next((row.state for row in STATE_TABLE if row.state in rows), KeyState.ACTIVE)
    assert derive_state(key, account, now, month_spend=spend) is first


@pytest.mark.parametrize(
    "state", [row.state for row in STATE_TABLE if row.state is not KeyState.ACTIVE]
)
def test_a_refused_state_is_answered_with_its_row(state: Row) -> None:
    authorizer = Authorizer(
        hmac_key=b"table",
        hold_ttl=dt.timedelta(minutes=10),
        default_max_output_tokens=1000,
        hotpath=None,
        rate_limits=RateLimits(MemoryStorage()),
        fallback_rate_limits=RateLimits(MemoryStorage()),
    )
    request = AuthorizeRequest(api_key="sk-table", model="m", request_id="req-table")
    _, key = build(Scenario(), utcnow())
    verdict = Verdict(state.value, "key", "acct", affordable_tokens=812)
    with pytest.raises(Refused) as refused:
        authorizer._decide(
            verdict, authorizer.rate_limits, request, hold(key, Scenario(), utcnow()), utcnow()
        )
    enforcement = ENFORCEMENT[state]
    assert enforcement.message is not None
    assert (
        refused.value.status,
        refused.value.code,
        refused.value.type,
        refused.value.message,
        refused.value.param,
    ) == (
        enforcement.http_status,
        enforcement.code,
        enforcement.type,
        enforcement.message.format(tokens=812),
        enforcement.param,
    )
    assert ("812" in refused.value.message) == (state is RequestRefusal.HOLD_EXCEEDS_AVAILABLE)
    assert (refused.value.retry_after is not None) == (state is KeyState.MONTHLY_QUOTA_EXCEEDED)
