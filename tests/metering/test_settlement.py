"""Settlement: events priced exactly at the version in effect when they occurred, charged once
through the ledger, unpriced usage parked and released, key states following balance and caps,
and the verifiers catching tampering (DESIGN 3, 4, 5, 6.2 and 7).

Expected money is computed here from the seed price file with integer arithmetic: a price in
nano-USD per million tokens times a token count is femto-USD; an event's parts are summed and
rounded once, half-up, to nano-USD.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from decimal import Decimal
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from billing.accounts.keys import KeyStateChange
from billing.catalog import catalog
from billing.catalog.catalog import PriceVersion
from billing.core.db import utcnow
from billing.ledger import ledger
from billing.ledger.ledger import LedgerEntry
from billing.metering import settlement, usage_events
from billing.metering.usage_events import UsageEvent
from billing.runtime import Runtime
from tests.support import key_state, new_key

USAGE = "/gateway/v1/usage"
USD9 = re.compile(r"-?[0-9]+\.[0-9]{9}")
SEED = json.loads(catalog.default_price_file().read_text())
SEED_START = dt.datetime.fromisoformat(SEED["effective_from"])


def nanos(usd: str) -> int:
    """Exact nano-USD of a decimal USD string (refusing anything finer than a nano)."""
    value = Decimal(usd) * 10**9
    assert value == value.to_integral_value(), usd
    return int(value)


# nano-USD per million tokens, straight from the seed file: (input, output).
SEED_PRICES = {
    model["id"]: (nanos(model["input_price_per_m"]), nanos(model["output_price_per_m"]))
    for model in SEED["models"]
}
MINI, LITE, CODE = "doubao-seed-2-0-mini", "doubao-seed-2-0-lite", "doubao-seed-2-0-code"


def femtos(
    counts: tuple[int, int, int, int],
    input_price: int,
    output_price: int,
    cached_price: int | None = None,
    reasoning_price: int | None = None,
) -> tuple[int, int, int, int]:
    """The exact priced parts (input, cached, output, reasoning) in femto-USD."""
    inp, cached, out, reasoning = counts
    return (
        (inp - cached) * input_price,
        cached * (input_price if cached_price is None else cached_price),
        (out - reasoning) * output_price,
        reasoning * (output_price if reasoning_price is None else reasoning_price),
    )


def rounded(parts: tuple[int, ...]) -> int:
    """Femto-USD to nano-USD, half-up, once."""
    return (sum(parts) + 500_000) // 1_000_000


def seed_cost(model: str, counts: tuple[int, int, int, int]) -> int:
    return rounded(femtos(counts, *SEED_PRICES[model]))


def breakdown_parts(breakdown: dict[str, Any] | None) -> tuple[int, int, int, int, int]:
    """The stored breakdown as exact (input, cached, output, reasoning) femto-USD and the total
    in nano-USD. It is stored either as integer femto/nano counts or as exact USD strings."""
    assert breakdown is not None
    names = ("input", "cached", "output", "reasoning")
    if "total_nanos" in breakdown:
        assert set(breakdown) == {f"{name}_femtos" for name in names} | {"total_nanos"}
        values = [breakdown[f"{name}_femtos"] for name in names] + [breakdown["total_nanos"]]
        assert all(type(value) is int for value in values), breakdown
        return tuple(values)  # type: ignore[return-value]
    assert set(breakdown) == {f"{name}_usd" for name in names} | {"total_usd"}
    assert USD9.fullmatch(breakdown["total_usd"]), breakdown
    parts = []
    for name in names:
        exact = Decimal(breakdown[f"{name}_usd"]) * 10**15
        assert exact == exact.to_integral_value(), breakdown
        parts.append(int(exact))
    return (*parts, nanos(breakdown["total_usd"]))  # type: ignore[return-value]


def new_account(admin: FlaskClient, credit: str = "0") -> str:
    account_id: str = admin.post("/admin/v1/accounts", json={"name": "metered"}).get_json()["id"]
    if Decimal(credit):
        adjust(admin, account_id, credit)
    return account_id


def adjust(admin: FlaskClient, account_id: str, amount: str) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": amount, "reason": "test"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.get_json()


def balance(admin: FlaskClient, account_id: str) -> int:
    body = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    assert USD9.fullmatch(body["balance_usd"]), body
    return nanos(body["balance_usd"])


def add_version(admin: FlaskClient, model_id: str, **fields: Any) -> dict[str, Any]:
    response = admin.post("/admin/v1/models", json={"id": model_id, **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def rid() -> str:
    return f"req-{uuid.uuid4()}"


def flat(
    key: dict[str, Any], model: str, counts: tuple[int, int, int, int], **fields: Any
) -> dict[str, Any]:
    inp, cached, out, reasoning = counts
    return {
        "request_id": rid(),
        "api_key": key["key"],
        "model": model,
        "input_tokens": inp,
        "cached_tokens": cached,
        "output_tokens": out,
        "reasoning_tokens": reasoning,
        **fields,
    }


def post(gateway: FlaskClient, *events: dict[str, Any]) -> None:
    body = events[0] if len(events) == 1 else {"events": list(events)}
    response = gateway.post(USAGE, json=body)
    assert response.status_code == 202, response.get_json()
    answer = response.get_json()
    assert (answer["accepted"], answer["rejected"]) == (len(events), []), answer


def rows(db: Session, *request_ids: str) -> dict[str, UsageEvent]:
    db.expire_all()
    found = db.scalars(select(UsageEvent).where(UsageEvent.request_id.in_(request_ids)))
    return {row.request_id: row for row in found}


def seed_version_id(db: Session, model: str) -> int:
    version = catalog.price_version_at(db, model, SEED_START)
    assert version is not None and version.effective_from == SEED_START
    return version.id


def usage_entries(admin: FlaskClient, account_id: str) -> list[dict[str, Any]]:
    response = admin.get(f"/admin/v1/accounts/{account_id}/ledger", query_string={"limit": 100})
    assert response.status_code == 200
    return [entry for entry in response.get_json()["data"] if entry["kind"] == "usage"]


def unpriced(admin: FlaskClient) -> dict[str, dict[str, Any]]:
    response = admin.get("/admin/v1/usage/unpriced")
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    return {item["model"]: item for item in body["data"]}


def state_changes(db: Session, key_id: str) -> list[tuple[str | None, str, str]]:
    db.expire_all()
    found = db.execute(
        select(KeyStateChange.old_state, KeyStateChange.new_state, KeyStateChange.reason)
        .where(KeyStateChange.key_id == key_id)
        .order_by(KeyStateChange.id)
    )
    return [(old, new, reason) for old, new, reason in found]


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


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
    row = rows(db, body["request_id"])[body["request_id"]]
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

    stored = rows(db, *(event["request_id"] for event in events))
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
    assert settlement.verify_costs(db) == []


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
    stored = rows(db, *events)
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
    assert rows(db, settled_early["request_id"])[settled_early["request_id"]].cost_nanos == (
        early_cost
    )

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

    stored = rows(
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
    assert settlement.verify_costs(db) == []


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
    stored = rows(db, now_event["request_id"], later_event["request_id"])
    assert stored[now_event["request_id"]].cost_nanos == seed_cost(MINI, counts) == 209_000
    assert stored[now_event["request_id"]].price_version_id == seed_version_id(db, MINI)
    assert stored[later_event["request_id"]].cost_nanos == 1_000 * 200 + 100 * 1_000
    assert stored[later_event["request_id"]].price_version_id == new_version


# --- unpriced usage ------------------------------------------------------------------------------


def test_usage_of_an_unpriced_model_is_parked_then_settled_when_priced(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    moments = [utcnow() - dt.timedelta(hours=hours) for hours in (5, 3, 1)]
    counts = (1_000_000, 200_000, 100_000, 10_000)
    events = [flat(key, "acme-new-model", counts, occurred_at=iso(at)) for at in moments]
    post(gateway, *events)
    stored = rows(db, *(event["request_id"] for event in events))
    for row in stored.values():
        assert (row.status, row.cost_nanos, row.ledger_entry_id) == ("unpriced", None, None)
    assert balance(admin, account_id) == nanos("10")
    listed = unpriced(admin)["acme-new-model"]
    assert listed["events"] == 3
    assert dt.datetime.fromisoformat(listed["first_occurred_at"]) == min(
        row.occurred_at for row in stored.values()
    )
    assert dt.datetime.fromisoformat(listed["last_occurred_at"]) == max(
        row.occurred_at for row in stored.values()
    )

    # A price from an instant after the events does not price them: still parked, never free.
    add_version(
        admin,
        "acme-new-model",
        input_price_per_m="1",
        output_price_per_m="4",
        effective_from=iso(moments[1] + dt.timedelta(minutes=1)),
    )
    stored = rows(db, *stored)
    assert [stored[e["request_id"]].status for e in events] == ["unpriced", "unpriced", "settled"]
    assert unpriced(admin)["acme-new-model"]["events"] == 2
    cost = rounded(femtos(counts, nanos("1"), nanos("4")))
    # Cached and reasoning default to the input and output prices.
    assert stored[events[2]["request_id"]].cost_nanos == cost == 1_000_000 * 1_000 + 100_000 * 4_000

    # A version starting before the first price covers only the unpriced span: the rest settles.
    add_version(
        admin,
        "acme-new-model",
        input_price_per_m="1",
        output_price_per_m="4",
        effective_from=iso(moments[0] - dt.timedelta(minutes=1)),
    )
    assert "acme-new-model" not in unpriced(admin)
    assert {row.status for row in rows(db, *stored).values()} == {"settled"}
    assert balance(admin, account_id) == nanos("10") - 3 * cost


def test_a_backdated_first_price_settles_everything_parked(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    counts = (3_000, 1_000, 700, 300)
    events = [
        flat(key, "acme-later-priced", counts, occurred_at=iso(utcnow() - dt.timedelta(days=2))),
        flat(key, "acme-later-priced", counts),
    ]
    post(gateway, *events)
    assert unpriced(admin)["acme-later-priced"]["events"] == 2

    version = add_version(
        admin,
        "acme-later-priced",
        input_price_per_m="0.7",
        output_price_per_m="2.8",
        cached_input_price_per_m="0.07",
        reasoning_price_per_m="5.6",
        effective_from=iso(utcnow() - dt.timedelta(days=3)),
    )["pricing"]
    cost = rounded(femtos(counts, nanos("0.7"), nanos("2.8"), nanos("0.07"), nanos("5.6")))
    # 2_000 * 700 + 1_000 * 70 + 400 * 2_800 + 300 * 5_600 nano-USD
    assert cost == 1_400_000 + 70_000 + 1_120_000 + 1_680_000
    stored = rows(db, *(event["request_id"] for event in events))
    for row in stored.values():
        assert (row.status, row.cost_nanos) == ("settled", cost)
        assert (row.model_id, row.price_version_id) == ("acme-later-priced", version["version_id"])
    assert "acme-later-priced" not in unpriced(admin)
    assert balance(admin, account_id) == nanos("10") - 2 * cost
    assert sum(nanos(entry["amount_usd"]) for entry in usage_entries(admin, account_id)) == (
        -2 * cost
    )
    assert settlement.verify_costs(db) == []
    assert ledger.reconcile(db) == []


def test_parked_usage_under_an_alias_spelling_settles_once_the_alias_is_added(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    counts = (88, 0, 230, 211)
    # Seed 002 names doubao-seed-2.0-pro, which ships without a price.
    event = flat(
        key, "doubao-seed-2.0-pro", counts, occurred_at=iso(utcnow() - dt.timedelta(hours=2))
    )
    post(gateway, event)
    assert rows(db, event["request_id"])[event["request_id"]].status == "unpriced"

    version = add_version(
        admin,
        "doubao-seed-2-0-pro",
        input_price_per_m="0.79",
        output_price_per_m="3.95",
        effective_from=iso(utcnow() - dt.timedelta(days=1)),
    )["pricing"]
    # The model is priced, but the reported spelling is not one of its names yet.
    row = rows(db, event["request_id"])[event["request_id"]]
    assert (row.status, row.cost_nanos) == ("unpriced", None)
    assert unpriced(admin)["doubao-seed-2.0-pro"]["events"] == 1

    alias = admin.post(
        "/admin/v1/models/doubao-seed-2-0-pro/aliases", json={"alias": "doubao-seed-2.0-pro"}
    )
    assert alias.status_code == 201, alias.get_json()
    row = rows(db, event["request_id"])[event["request_id"]]
    assert row.status == "settled"
    assert row.model == "doubao-seed-2.0-pro"
    assert (row.model_id, row.price_version_id) == ("doubao-seed-2-0-pro", version["version_id"])
    assert row.cost_nanos == 88 * 790 + 230 * 3_950
    assert "doubao-seed-2.0-pro" not in unpriced(admin)
    assert balance(admin, account_id) == nanos("10") - (88 * 790 + 230 * 3_950)


# --- key states follow settlement ----------------------------------------------------------------


def test_settlement_to_zero_flips_every_key_of_the_account_to_402_and_a_credit_restores_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    counts = (1_000, 0, 0, 0)  # 1_000 code input tokens: 1_490_000 nano-USD
    assert seed_cost(CODE, counts) == 1_490_000
    account_id = new_account(admin, "0.00149")
    first, second = new_key(admin, account_id), new_key(admin, account_id)
    bystander_account = new_account(admin, "0.00149")
    bystander = new_key(admin, bystander_account)
    for key in (first, second, bystander):
        assert key_state(admin, key["id"]) == ("active", 200)

    post(gateway, flat(first, CODE, counts))
    assert balance(admin, account_id) == 0  # exactly zero is insufficient
    for key in (first, second):
        assert key_state(admin, key["id"]) == ("insufficient_balance", 402)
        old, new, reason = state_changes(db, key["id"])[-1]
        assert (old, new) == ("active", "insufficient_balance")
        assert "usage" in reason
    assert key_state(admin, bystander["id"]) == ("active", 200)

    # Usage keeps being charged past zero (the tokens were spent upstream).
    post(gateway, flat(second, CODE, counts))
    assert balance(admin, account_id) == -1_490_000
    assert key_state(admin, second["id"]) == ("insufficient_balance", 402)

    adjust(admin, account_id, "0.00149")  # back to exactly zero: still 402
    assert key_state(admin, first["id"]) == ("insufficient_balance", 402)
    adjust(admin, account_id, "0.000000001")
    for key in (first, second):
        assert key_state(admin, key["id"]) == ("active", 200)
        old, new, reason = state_changes(db, key["id"])[-1]
        assert (old, new) == ("insufficient_balance", "active")
        assert "credit" in reason


def test_a_monthly_cap_is_429_once_settled_spend_reaches_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    counts = (1_000, 0, 0, 0)  # 1_490_000 nano-USD on code
    account_id = new_account(admin, "10")
    capped = new_key(admin, account_id, monthly_cap_usd="0.00298")  # two such events
    uncapped = new_key(admin, account_id)

    post(gateway, flat(capped, CODE, counts))
    assert key_state(admin, capped["id"]) == ("active", 200)  # 1_490_000 < 2_980_000
    post(gateway, flat(uncapped, CODE, counts), flat(uncapped, CODE, counts))
    assert key_state(admin, capped["id"]) == ("active", 200)  # the cap is per key

    post(gateway, flat(capped, CODE, counts))  # spend == cap
    assert key_state(admin, capped["id"]) == ("monthly_quota_exceeded", 429)
    old, new, reason = state_changes(db, capped["id"])[-1]
    assert (old, new) == ("active", "monthly_quota_exceeded")
    assert "usage" in reason
    assert key_state(admin, uncapped["id"]) == ("active", 200)

    # Raising the cap above the spend returns the key to active.
    raised = admin.patch(f"/admin/v1/keys/{capped['id']}", json={"monthly_cap_usd": "0.002980001"})
    assert raised.status_code == 200, raised.get_json()
    assert key_state(admin, capped["id"]) == ("active", 200)


def test_402_wins_over_429_and_a_credit_leaves_the_cap_in_force(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    counts = (1_000, 0, 0, 0)  # 1_490_000 nano-USD on code
    account_id = new_account(admin, "0.001")
    capped = new_key(admin, account_id, monthly_cap_usd="0.001")
    uncapped = new_key(admin, account_id)
    post(gateway, flat(capped, CODE, counts))  # over the cap and below zero at once
    assert balance(admin, account_id) == 1_000_000 - 1_490_000
    assert key_state(admin, capped["id"]) == ("insufficient_balance", 402)
    assert key_state(admin, uncapped["id"]) == ("insufficient_balance", 402)

    adjust(admin, account_id, "5")
    assert key_state(admin, uncapped["id"]) == ("active", 200)
    assert key_state(admin, capped["id"]) == ("monthly_quota_exceeded", 429)
    assert [(old, new) for old, new, _ in state_changes(db, capped["id"])][-2:] == [
        ("active", "insufficient_balance"),
        ("insufficient_balance", "monthly_quota_exceeded"),
    ]


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
        db, items, prefix_items=True, hmac_key=runtime.settings.hmac_key, now=utcnow()
    )
    assert (result.accepted, result.rejected) == (5, [])
    ids = [item["request_id"] for item in items]
    assert {row.status for row in rows(db, *ids).values()} == {"pending"}

    first = settlement.settle_batch(db, low_balance_nanos=0, now=utcnow(), limit=2)
    assert (first.claimed, first.settled, first.unpriced, first.accounts_charged) == (2, 2, 0, 1)
    rest = settlement.settle_batch(db, low_balance_nanos=0, now=utcnow())
    assert (rest.claimed, rest.settled) == (3, 3)
    again = settlement.settle_batch(db, low_balance_nanos=0, now=utcnow())
    assert again.claimed == again.settled == 0
    assert runtime.settle_pending() == 0

    stored = rows(db, *ids)
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
    assert settlement.verify_costs(db) == []


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


# --- the verifiers catch tampering ---------------------------------------------------------------


def test_verify_costs_and_reconcile_are_clean_and_catch_tampering(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    chat = {
        "request_id": rid(),
        "api_key": key["key"],
        "model": LITE,
        "usage": {"prompt_tokens": 5_000, "completion_tokens": 700},
    }
    plain = flat(key, CODE, (4_000, 1_000, 300, 100))
    post(gateway, chat, plain)
    assert settlement.verify_costs(db) == []
    assert ledger.reconcile(db) == []
    chat_cost = seed_cost(LITE, (5_000, 0, 700, 0))
    plain_cost = seed_cost(CODE, (4_000, 1_000, 300, 100))
    entry_id = rows(db, chat["request_id"])[chat["request_id"]].ledger_entry_id

    tampered = db.begin_nested()
    db.execute(
        text("UPDATE usage_events SET cost_nanos = cost_nanos + 1 WHERE request_id = :r"),
        {"r": chat["request_id"]},
    )
    mismatches = {item.subject: item for item in settlement.verify_costs(db)}
    assert set(mismatches) == {f"event {chat['request_id']}", f"ledger entry {entry_id}"}
    event_mismatch = mismatches[f"event {chat['request_id']}"]
    assert (event_mismatch.charged_nanos, event_mismatch.recomputed_nanos) == (
        chat_cost + 1,
        chat_cost,
    )
    assert chat["request_id"] in str(event_mismatch)
    assert ledger.reconcile(db) == []  # the balance still equals its entries
    tampered.rollback()
    assert settlement.verify_costs(db) == []

    # Counts changed behind the stored cost (a flat report: recomputed from the columns).
    tampered = db.begin_nested()
    db.execute(
        text("UPDATE usage_events SET input_tokens = input_tokens + 1 WHERE request_id = :r"),
        {"r": plain["request_id"]},
    )
    [mismatch] = settlement.verify_costs(db)
    assert mismatch.subject == f"event {plain['request_id']}"
    assert (mismatch.charged_nanos, mismatch.recomputed_nanos) == (plain_cost, plain_cost + 1_490)
    tampered.rollback()

    # The raw report changed behind the stored cost.
    tampered = db.begin_nested()
    db.execute(
        text("UPDATE usage_events SET usage_raw = CAST(:raw AS JSON) WHERE request_id = :r"),
        {
            "r": chat["request_id"],
            "raw": json.dumps({"prompt_tokens": 5_000, "completion_tokens": 701}),
        },
    )
    [mismatch] = settlement.verify_costs(db)
    assert (mismatch.charged_nanos, mismatch.recomputed_nanos) == (chat_cost, chat_cost + 1_990)
    tampered.rollback()

    # A balance moved without an entry.
    tampered = db.begin_nested()
    db.execute(
        text("UPDATE accounts SET balance_nanos = balance_nanos - 7 WHERE id = :id"),
        {"id": account_id},
    )
    [drift] = ledger.reconcile(db)
    expected_balance = nanos("10") - chat_cost - plain_cost
    assert (drift.account_id, drift.balance_nanos, drift.entries_nanos) == (
        account_id,
        expected_balance - 7,
        expected_balance,
    )
    tampered.rollback()
    assert ledger.reconcile(db) == []
    assert settlement.verify_costs(db) == []
