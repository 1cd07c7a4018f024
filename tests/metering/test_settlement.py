"""Settlement: events priced exactly at the version in effect when they occurred, charged once
through the ledger, never settled twice (DESIGN 3, 4, 6.2 and 7). Unpriced usage is in
test_unpriced.py, key states in test_settlement_key_states.py, the verifiers catching tampering
in test_reconcile_paths.py."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.catalog.catalog import PriceVersion
from billing.core.db import utcnow
from billing.ledger import ledger
from billing.ledger.ledger import LedgerEntry
from billing.metering import reconcile, settlement, usage_events
from billing.runtime import Runtime
from tests.metering.support import (
    CODE,
    LITE,
    MINI,
    SEED_PRICES,
    USAGE,
    USD9,
    add_version,
    balance,
    femtos,
    flat,
    iso,
    nanos,
    new_account,
    post,
    rid,
    rounded,
    seed_cost,
    seed_version_id,
    stored_events,
    usage_entries,
)
from tests.support import new_key


def breakdown_parts(breakdown: dict[str, Any] | None) -> tuple[int, int, int, int, int]:
    """The stored breakdown as exact (input, cached, output, reasoning) femto-USD and the total
    in nano-USD. It is stored either as integer femto/nano counts or as exact USD strings."""
    assert breakdown is not None
    names = ("input", "cached", "output", "reasoning")
    if "total_nanos" in breakdown:
        assert set(breakdown) == {f"{name}_femtos" for name in names} | {"total_nanos"}
        values = [breakdown[f"{name}_femtos"] for name in names] + [breakdown["total_nanos"]]
        assert all(type(value) is int for value in values), breakdown
        return tuple(values)
    assert set(breakdown) == {f"{name}_usd" for name in names} | {"total_usd"}
    assert USD9.fullmatch(breakdown["total_usd"]), breakdown
    parts = []
    for name in names:
        exact = Decimal(breakdown[f"{name}_usd"]) * 10**15
        assert exact == exact.to_integral_value(), breakdown
        parts.append(int(exact))
    inp, cached, out, reasoning = parts
    return (inp, cached, out, reasoning, nanos(breakdown["total_usd"]))


# --- exact costs -------------------------------------------------------------------------------


def test_the_seed_002_event_costs_exactly_what_the_seed_prices_say(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "1")
    key = new_key(admin, account_id)
    body = {
        "request_id": rid(),
        "api_key": key["key"],
        "model": "doubao-seed-2.0-lite",  # the alias spelling
        "usage": {
            "input_tokens": 88,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 230,
            "output_tokens_details": {"reasoning_tokens": 211},
            "total_tokens": 318,
        },
    }
    post(gateway, body)
    row = stored_events(db, body["request_id"])[body["request_id"]]
    # 88 input tokens at 0.39 USD/M, 230 output tokens (211 of them reasoning, billed as output,
    # never on top) at 1.99 USD/M: 34_320 + 457_700 nano-USD.
    assert row.status == "settled"
    assert row.cost_nanos == 492_020
    assert row.model == "doubao-seed-2.0-lite"
    assert row.model_id == LITE
    assert breakdown_parts(row.cost_breakdown) == (
        88 * 390_000_000,
        0,
        19 * 1_990_000_000,
        211 * 1_990_000_000,
        492_020,
    )
    assert balance(admin, account_id) == 1_000_000_000 - 492_020


def test_each_event_is_settled_at_its_exact_cost_and_charged_through_the_ledger(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "50")
    key = new_key(admin, account_id)
    cases = [
        (MINI, "doubao-seed-2-0-mini", (1, 0, 0, 0)),
        (MINI, "doubao-seed-2.0-mini", (123_457, 100_000, 98_765, 4_321)),
        (LITE, "doubao-seed-2-0-lite", (0, 0, 0, 0)),
        (LITE, "doubao-seed-2-0-lite", (5_000_000, 4_999_999, 1, 1)),
        (CODE, "doubao-seed-2-0-code", (2_048, 1_024, 31_999, 30_000)),
        (CODE, "doubao-seed-2-0-code-preview-260215", (77, 7, 777, 77)),
        (CODE, "doubao-seed-2.0-code", (100_000_000, 0, 32_768, 0)),
    ]
    events = []
    for index, (_, name, counts) in enumerate(cases):
        inp, cached, out, reasoning = counts
        shape = index % 3
        if shape == 0:
            events.append(flat(key, name, counts))
        elif shape == 1:
            usage = {
                "prompt_tokens": inp,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens": out,
                "completion_tokens_details": {"reasoning_tokens": reasoning},
            }
            events.append({"request_id": rid(), "key_id": key["id"], "model": name, "usage": usage})
        else:
            usage = {
                "input_tokens": inp,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": inp + out,
            }
            events.append(
                {"request_id": rid(), "api_key": key["key"], "model": name, "usage": usage}
            )
    post(gateway, *events)

    stored = stored_events(db, *(event["request_id"] for event in events))
    total = 0
    entry_ids = set()
    for event, (model, _, counts) in zip(events, cases, strict=True):
        row = stored[event["request_id"]]
        parts = femtos(counts, *SEED_PRICES[model])
        cost = rounded(parts)
        assert row.status == "settled", event
        assert row.cost_nanos == cost, (event, row.cost_nanos, cost)
        assert row.model_id == model
        assert row.price_version_id == seed_version_id(db, model)
        assert row.settled_at is not None
        assert breakdown_parts(row.cost_breakdown) == (*parts, cost)
        if cost:
            assert row.ledger_entry_id is not None
            entry_ids.add(row.ledger_entry_id)
        else:
            assert row.ledger_entry_id is None  # nothing charged, nothing entered
        total += cost
    # Hand-checked anchors: one mini input token is 140 nano-USD; 100M code input tokens 149 USD.
    assert stored[events[0]["request_id"]].cost_nanos == 140
    assert stored[events[6]["request_id"]].cost_nanos == 149_000_000_000 + 32_768 * 6_990
    assert stored[events[2]["request_id"]].cost_nanos == 0

    assert balance(admin, account_id) == nanos("50") - total
    entries = usage_entries(admin, account_id)
    assert entries and {entry["id"] for entry in entries} == entry_ids
    assert sum(nanos(entry["amount_usd"]) for entry in entries) == -total
    assert all(entry["reference"].startswith("settlement:") for entry in entries)
    assert ledger.reconcile(db) == []
    assert reconcile.verify_costs(db).mismatches == []


def test_the_total_is_rounded_once_half_up_from_exact_parts(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    # 0.0005 USD/M is half a nano-USD a token; 0.000499999 USD/M a hair less.
    add_version(
        admin,
        "acme-rounding",
        input_price_per_m="0.0005",
        output_price_per_m="0.000499999",
        cached_input_price_per_m="0.000000001",
        reasoning_price_per_m="0.0015",
        effective_from=iso(utcnow() - dt.timedelta(days=1)),
    )
    prices = (nanos("0.0005"), nanos("0.000499999"), nanos("0.000000001"), nanos("0.0015"))
    assert prices == (500_000, 499_999, 1, 1_500_000)
    account_id = new_account(admin, "1")
    key = new_key(admin, account_id)
    cases = {
        (1, 0, 0, 0): 1,  # 0.5 rounds up
        (3, 0, 0, 0): 2,  # 1.5 rounds up
        (0, 0, 1, 0): 0,  # 0.499999 rounds down
        (0, 0, 2, 0): 1,  # 0.999998
        (1, 0, 1, 0): 1,  # 0.999999: the parts are summed before the one rounding
        (0, 0, 1, 1): 2,  # 1.5: reasoning at its own price, never on top of output
        (499_999, 499_999, 0, 0): 0,  # 499_999 femto-USD of cached input
        (500_000, 500_000, 0, 0): 1,  # 500_000 femto-USD: exactly half
        (1_000_001, 1_000_000, 0, 0): 2,  # 1_000_000 + 500_000 femto-USD: 1.5
    }
    events = {flat(key, "acme-rounding", counts)["request_id"]: counts for counts in cases}
    bodies = [
        {**flat(key, "acme-rounding", counts), "request_id": request_id}
        for request_id, counts in events.items()
    ]
    post(gateway, *bodies)
    stored = stored_events(db, *events)
    for request_id, counts in events.items():
        assert stored[request_id].cost_nanos == cases[counts], counts
        assert rounded(femtos(counts, *prices)) == cases[counts], counts
    assert balance(admin, account_id) == nanos("1") - sum(cases.values())


# --- versions by occurred_at ---------------------------------------------------------------------


def test_an_event_is_priced_at_the_version_in_effect_when_it_occurred(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    first_start = (utcnow() - dt.timedelta(days=10)).replace(microsecond=0)
    first = add_version(
        admin,
        "acme-versioned",
        input_price_per_m="2",
        output_price_per_m="8",
        cached_input_price_per_m="0.5",
        effective_from=iso(first_start),
    )["pricing"]
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    counts = (10_000, 4_000, 2_000, 500)
    settled_early = flat(key, "acme-versioned", counts, occurred_at=iso(utcnow()))
    post(gateway, settled_early)
    early_cost = rounded(femtos(counts, nanos("2"), nanos("8"), nanos("0.5")))
    assert stored_events(db, settled_early["request_id"])[
        settled_early["request_id"]
    ].cost_nanos == (early_cost)

    second = add_version(admin, "acme-versioned", input_price_per_m="3", output_price_per_m="12")[
        "pricing"
    ]
    second_start = dt.datetime.fromisoformat(second["effective_from"])
    assert second["version_id"] != first["version_id"]
    assert second_start > first_start

    before = flat(
        key, "acme-versioned", counts, occurred_at=iso(second_start - dt.timedelta(hours=1))
    )
    at_start = flat(key, "acme-versioned", counts, occurred_at=iso(second_start))
    after = flat(key, "acme-versioned", counts)  # occurred_at: now, after the new version began
    too_early = flat(
        key, "acme-versioned", counts, occurred_at=iso(first_start - dt.timedelta(seconds=1))
    )
    post(gateway, before, at_start, after, too_early)

    stored = stored_events(
        db, *(e["request_id"] for e in (settled_early, before, at_start, after, too_early))
    )
    new_cost = rounded(femtos(counts, nanos("3"), nanos("12")))
    assert early_cost != new_cost
    expectations = [
        (settled_early, first["version_id"], early_cost),  # not repriced by the new version
        (before, first["version_id"], early_cost),
        (at_start, second["version_id"], new_cost),
        (after, second["version_id"], new_cost),
    ]
    for event, version_id, cost in expectations:
        row = stored[event["request_id"]]
        assert (row.status, row.price_version_id, row.cost_nanos) == ("settled", version_id, cost)
    # Before the model had any price: parked, never free.
    parked = stored[too_early["request_id"]]
    assert (parked.status, parked.cost_nanos, parked.price_version_id) == ("unpriced", None, None)
    assert balance(admin, account_id) == nanos("10") - 2 * early_cost - 2 * new_cost
    assert reconcile.verify_costs(db).mismatches == []


def test_a_future_version_of_a_seed_model_prices_only_what_occurs_after_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    starts = (utcnow() + dt.timedelta(minutes=2)).replace(microsecond=0)
    future = add_version(
        admin, MINI, input_price_per_m="0.2", output_price_per_m="1", effective_from=iso(starts)
    )
    # The version in effect now is still the seed's.
    assert future["pricing"]["version_id"] == seed_version_id(db, MINI)
    new_version = db.scalar(
        select(PriceVersion.id).where(
            PriceVersion.model_id == MINI, PriceVersion.effective_from == starts
        )
    )
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    counts = (1_000, 0, 100, 0)
    now_event = flat(key, MINI, counts)
    later_event = flat(key, MINI, counts, occurred_at=iso(starts + dt.timedelta(minutes=1)))
    post(gateway, now_event, later_event)
    stored = stored_events(db, now_event["request_id"], later_event["request_id"])
    assert stored[now_event["request_id"]].cost_nanos == seed_cost(MINI, counts) == 209_000
    assert stored[now_event["request_id"]].price_version_id == seed_version_id(db, MINI)
    assert stored[later_event["request_id"]].cost_nanos == 1_000 * 200 + 100 * 1_000
    assert stored[later_event["request_id"]].price_version_id == new_version


# --- settling twice never charges twice ----------------------------------------------------------


def test_settle_batch_twice_never_settles_an_event_twice(
    admin: FlaskClient, db: Session, runtime: Runtime
) -> None:
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    counts = [(1_000 * n, 10 * n, 100 * n, n) for n in range(1, 6)]
    items = [flat(key, LITE, c) for c in counts]
    # Ingest without the after-commit trigger, so that the events wait for us.
    result = usage_events.ingest(
        db,
        items,
        prefix_items=True,
        hmac_key=runtime.settings.hmac_key,
        max_age=runtime.settings.usage_max_age,
        now=utcnow(),
    )
    assert (result.accepted, result.rejected) == (5, [])
    ids = [item["request_id"] for item in items]
    assert {row.status for row in stored_events(db, *ids).values()} == {"pending"}

    first = settlement.settle_batch(db, low_balance_nanos=0, now=utcnow(), limit=2)
    assert (first.claimed, first.settled, first.unpriced, first.accounts_charged) == (2, 2, 0, 1)
    rest = settlement.settle_batch(db, low_balance_nanos=0, now=utcnow())
    assert (rest.claimed, rest.settled) == (3, 3)
    again = settlement.settle_batch(db, low_balance_nanos=0, now=utcnow())
    assert again.claimed == again.settled == 0
    assert runtime.settle_pending() == 0

    stored = stored_events(db, *ids)
    expected = [seed_cost(LITE, c) for c in counts]
    assert [stored[i].cost_nanos for i in ids] == expected
    assert all(stored[i].status == "settled" for i in ids)
    entries = db.scalars(
        select(LedgerEntry).where(LedgerEntry.account_id == account_id, LedgerEntry.kind == "usage")
    ).all()
    assert len(entries) == 2  # one per batch that charged the account
    assert sum(entry.amount_nanos for entry in entries) == -sum(expected)
    assert balance(admin, account_id) == nanos("10") - sum(expected)
    assert ledger.reconcile(db) == []
    assert reconcile.verify_costs(db).mismatches == []


def test_settling_after_the_in_process_settlement_claims_nothing(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    event = flat(key, MINI, (100, 0, 10, 0))
    post(gateway, event)
    settled_balance = balance(admin, account_id)
    assert settled_balance == nanos("10") - seed_cost(MINI, (100, 0, 10, 0))
    assert settlement.settle_batch(db, low_balance_nanos=0, now=utcnow()).claimed == 0
    repeat = gateway.post(USAGE, json=event)
    assert repeat.status_code == 202 and repeat.get_json()["duplicates"] == 1
    assert settlement.settle_batch(db, low_balance_nanos=0, now=utcnow()).claimed == 0
    assert balance(admin, account_id) == settled_balance
