"""Each key's spend per UTC month (``key_month_spend``): kept by settlement in the transaction
that charges, equal to a recomputation from the settled events whatever the batches, split by
the month the events occurred in, and read by month_spend with one row per key."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts import accounts, keys, rollups
from billing.accounts.rollups import KeyMonthSpend
from billing.core.db import utcnow
from billing.metering import settlement, usage_events
from billing.metering.usage_events import UsageEvent
from billing.runtime import Runtime
from tests.metering.support import CODE, LITE, MINI, rid, seed_cost

MAX_AGE = dt.timedelta(days=35)


def new_keys(db: Session, runtime: Runtime, count: int, *, at: dt.datetime) -> list[str]:
    account = accounts.create_account(db, name="spend", email=None, now=at)
    settings_ = keys.KeySettings(
        name="k", rate_limit=None, monthly_cap_nanos=None, allowed_models=None, expires_at=None
    )
    return [
        keys.issue_key(
            db,
            account_id=account.id,
            settings=settings_,
            hmac_key=runtime.settings.hmac_key,
            now=at,
        )[0].id
        for _ in range(count)
    ]


def report(db: Session, runtime: Runtime, items: list[dict[str, Any]], *, at: dt.datetime) -> None:
    result = usage_events.ingest(
        db, items, prefix_items=True, hmac_key=runtime.settings.hmac_key, max_age=MAX_AGE, now=at
    )
    assert (result.accepted, result.rejected) == (len(items), [])


def settle(db: Session, *, at: dt.datetime, batch: int) -> None:
    while settlement.settle_batch(db, low_balance_nanos=0, now=at, limit=batch).claimed:
        pass


def recomputed(db: Session, key_ids: list[str]) -> dict[tuple[str, dt.date], int]:
    """Each key's settled spend per month of occurrence, summed here from the events."""
    totals: dict[tuple[str, dt.date], int] = defaultdict(int)
    rows = db.execute(
        select(UsageEvent.key_id, UsageEvent.occurred_at, UsageEvent.cost_nanos).where(
            UsageEvent.key_id.in_(key_ids), UsageEvent.status == "settled"
        )
    )
    for key_id, occurred_at, cost in rows:
        assert cost is not None
        totals[(key_id, occurred_at.astimezone(dt.UTC).date().replace(day=1))] += cost
    return {month: total for month, total in totals.items() if total}


def stored(db: Session, key_ids: list[str]) -> dict[tuple[str, dt.date], int]:
    rows = db.execute(
        select(KeyMonthSpend.key_id, KeyMonthSpend.month, KeyMonthSpend.spend_nanos).where(
            KeyMonthSpend.key_id.in_(key_ids)
        )
    )
    return {(key_id, month): spend for key_id, month, spend in rows}


_event = st.tuples(
    st.integers(0, 2),  # which key
    st.sampled_from([MINI, LITE, CODE]),
    st.integers(0, 400_000),  # input tokens
    st.integers(0, 20_000),  # output tokens
    st.integers(0, 34 * 24 * 60),  # minutes before the report: always across a month's turn
)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reports=st.lists(st.lists(_event, min_size=1, max_size=15), min_size=1, max_size=3),
    batch=st.integers(1, 9),
)
def test_the_monthly_spend_equals_a_recomputation_from_the_events(
    db: Session, runtime: Runtime, reports: list[list[tuple[int, str, int, int, int]]], batch: int
) -> None:
    savepoint = db.begin_nested()
    try:
        now = utcnow()
        key_ids = new_keys(db, runtime, 3, at=now - MAX_AGE)
        for events in reports:
            report(
                db,
                runtime,
                [
                    {
                        "request_id": rid(),
                        "key_id": key_ids[which],
                        "model": model,
                        "input_tokens": inp,
                        "output_tokens": out,
                        "occurred_at": (now - dt.timedelta(minutes=ago)).isoformat(),
                    }
                    for which, model, inp, out, ago in events
                ],
                at=now,
            )
            settle(db, at=now, batch=batch)
        expected = recomputed(db, key_ids)
        assert stored(db, key_ids) == expected
        for month in {month for _, month in expected}:
            moment = dt.datetime.combine(month, dt.time(12), dt.UTC)
            assert rollups.month_spend(db, key_ids, now=moment) == {
                key_id: total for (key_id, at), total in expected.items() if at == month
            }
    finally:
        savepoint.rollback()


def test_spend_lands_in_the_month_the_usage_occurred_and_the_new_month_starts_at_zero(
    db: Session, runtime: Runtime
) -> None:
    turn = dt.datetime.combine(rollups.month_start(utcnow()), dt.time(), dt.UTC)
    [key_id] = new_keys(db, runtime, 1, at=turn - dt.timedelta(days=2))
    before = {"input_tokens": 1_000, "output_tokens": 10}
    after = {"input_tokens": 2_000, "output_tokens": 20}
    report(
        db,
        runtime,
        [
            {"request_id": rid(), "key_id": key_id, "model": CODE, **counts, "occurred_at": at}
            for counts, at in [
                (before, (turn - dt.timedelta(minutes=1)).isoformat()),
                (after, (turn + dt.timedelta(minutes=1)).isoformat()),
            ]
        ],
        at=turn + dt.timedelta(minutes=2),
    )
    settle(db, at=turn + dt.timedelta(minutes=2), batch=10)
    last_month, this_month = seed_cost(CODE, (1_000, 0, 10, 0)), seed_cost(CODE, (2_000, 0, 20, 0))
    assert rollups.month_spend(db, [key_id], now=turn - dt.timedelta(seconds=1)) == {
        key_id: last_month
    }
    assert rollups.month_spend(db, [key_id], now=turn) == {key_id: this_month}
    next_turn = (turn + dt.timedelta(days=32)).replace(day=1)
    assert rollups.month_spend(db, [key_id], now=next_turn) == {}
    assert rollups.month_spend(db, [], now=turn) == {}
