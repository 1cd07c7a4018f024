"""Unpriced usage: parked, never free, listed for the operator, and settled once a price (or an
alias) covers it (DESIGN 4 and 6.2)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from billing.ledger import ledger
from billing.metering import reconcile
from tests.metering.support import (
    add_version,
    balance,
    femtos,
    flat,
    iso,
    nanos,
    new_account,
    post,
    rounded,
    stored_events,
    usage_entries,
)
from tests.support import new_key


def unpriced(admin: FlaskClient) -> dict[str, dict[str, Any]]:
    response = admin.get("/admin/v1/usage/unpriced")
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    return {item["model"]: item for item in body["data"]}


def test_usage_of_an_unpriced_model_is_parked_then_settled_when_priced(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    moments = [utcnow() - dt.timedelta(hours=hours) for hours in (5, 3, 1)]
    counts = (1_000_000, 200_000, 100_000, 10_000)
    events = [flat(key, "acme-new-model", counts, occurred_at=iso(at)) for at in moments]
    post(gateway, *events)
    stored = stored_events(db, *(event["request_id"] for event in events))
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
    stored = stored_events(db, *stored)
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
    assert {row.status for row in stored_events(db, *stored).values()} == {"settled"}
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
    stored = stored_events(db, *(event["request_id"] for event in events))
    for row in stored.values():
        assert (row.status, row.cost_nanos) == ("settled", cost)
        assert (row.model_id, row.price_version_id) == ("acme-later-priced", version["version_id"])
    assert "acme-later-priced" not in unpriced(admin)
    assert balance(admin, account_id) == nanos("10") - 2 * cost
    assert sum(nanos(entry["amount_usd"]) for entry in usage_entries(admin, account_id)) == (
        -2 * cost
    )
    assert reconcile.verify_costs(db).mismatches == []
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
    assert stored_events(db, event["request_id"])[event["request_id"]].status == "unpriced"

    version = add_version(
        admin,
        "doubao-seed-2-0-pro",
        input_price_per_m="0.79",
        output_price_per_m="3.95",
        effective_from=iso(utcnow() - dt.timedelta(days=1)),
    )["pricing"]
    # The model is priced, but the reported spelling is not one of its names yet.
    row = stored_events(db, event["request_id"])[event["request_id"]]
    assert (row.status, row.cost_nanos) == ("unpriced", None)
    assert unpriced(admin)["doubao-seed-2.0-pro"]["events"] == 1

    alias = admin.post(
        "/admin/v1/models/doubao-seed-2-0-pro/aliases", json={"alias": "doubao-seed-2.0-pro"}
    )
    assert alias.status_code == 201, alias.get_json()
    row = stored_events(db, event["request_id"])[event["request_id"]]
    assert row.status == "settled"
    assert row.model == "doubao-seed-2.0-pro"
    assert (row.model_id, row.price_version_id) == ("doubao-seed-2-0-pro", version["version_id"])
    assert row.cost_nanos == 88 * 790 + 230 * 3_950
    assert "doubao-seed-2.0-pro" not in unpriced(admin)
    assert balance(admin, account_id) == nanos("10") - (88 * 790 + 230 * 3_950)
