"""Usage ingest over POST /gateway/v1/usage: one event in both usage shapes or flat counts, and
idempotency by request id (DESIGN 4 and 6.2). Batches are in test_ingest_batches.py, refused
items in test_ingest_refusals.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from tests.metering.support import (
    CHAT_USAGE,
    RESPONSES_USAGE,
    USAGE,
    balance,
    count,
    counts,
    event,
    funded_key,
    report,
    stored_events,
)
from tests.support import assert_error

# --- one event -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [(CHAT_USAGE, (1200, 1000, 300, 120)), (RESPONSES_USAGE, (88, 0, 230, 211))],
    ids=["chat_completions", "responses"],
)
def test_a_single_event_with_a_usage_object_is_accepted_and_normalised(
    admin: FlaskClient, gateway: FlaskClient, db: Session, usage: dict[str, Any], expected: Any
) -> None:
    key = funded_key(admin)
    occurred = "2026-11-20T08:30:00Z"
    body = event(key, usage=usage, input_tokens=..., output_tokens=..., occurred_at=occurred)
    assert report(gateway, body) == {
        "object": "usage_report",
        "accepted": 1,
        "duplicates": 0,
        "rejected": [],
    }
    row = stored_events(db, body["request_id"])[body["request_id"]]
    assert counts(row) == expected
    assert row.usage_raw == usage
    assert row.key_id == key["id"]
    assert row.account_id == key["account_id"]
    assert row.model == "doubao-seed-2-0-lite"
    assert row.outcome == "completed"
    assert row.occurred_at == dt.datetime(2026, 11, 20, 8, 30, tzinfo=dt.UTC)
    assert row.received_at >= row.occurred_at


def test_a_single_event_with_flat_counts_is_accepted(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    full = event(key, input_tokens=500, cached_tokens=100, output_tokens=50, reasoning_tokens=7)
    minimal = event(key, input_tokens=40, output_tokens=3)  # cached and reasoning default to 0
    for body in (full, minimal):
        assert report(gateway, body)["accepted"] == 1
    rows = stored_events(db, full["request_id"], minimal["request_id"])
    assert counts(rows[full["request_id"]]) == (500, 100, 50, 7)
    assert counts(rows[minimal["request_id"]]) == (40, 0, 3, 0)
    assert rows[full["request_id"]].usage_raw is None


def test_an_event_may_name_its_key_by_id(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    body = event(key, api_key=..., key_id=key["id"])
    assert report(gateway, body)["accepted"] == 1
    row = stored_events(db, body["request_id"])[body["request_id"]]
    assert (row.key_id, row.account_id) == (key["id"], key["account_id"])


def test_omitted_occurred_at_is_the_time_of_receipt(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    before = dt.datetime.now(dt.UTC)
    body = event(key)
    assert report(gateway, body)["accepted"] == 1
    after = dt.datetime.now(dt.UTC)
    row = stored_events(db, body["request_id"])[body["request_id"]]
    assert before <= row.occurred_at <= after
    assert row.occurred_at == row.received_at


def test_occurred_at_is_stored_in_utc_whatever_the_offset(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    body = event(key, occurred_at="2026-11-20T10:00:00+08:00")
    assert report(gateway, body)["accepted"] == 1
    row = stored_events(db, body["request_id"])[body["request_id"]]
    assert row.occurred_at == dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize("outcome", ["completed", "failed", "client_disconnected"])
def test_every_outcome_is_accepted_and_stored(
    admin: FlaskClient, gateway: FlaskClient, db: Session, outcome: str
) -> None:
    key = funded_key(admin)
    body = event(key, outcome=outcome)
    assert report(gateway, body)["accepted"] == 1
    assert stored_events(db, body["request_id"])[body["request_id"]].outcome == outcome


def test_an_event_of_a_revoked_key_is_still_accepted_and_charged(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin, credit="10")
    revoked = admin.post(f"/admin/v1/keys/{key['id']}/revoke")
    assert revoked.status_code == 200 and revoked.get_json()["state"] == "revoked"
    before = balance(admin, key["account_id"])
    # lite costs 0.39 USD per M input and 1.99 USD per M output tokens: 1M input tokens are
    # 390_000_000 nano-USD, 100k output tokens 199_000_000.
    body = event(key, input_tokens=1_000_000, output_tokens=100_000)
    assert report(gateway, body)["accepted"] == 1
    row = stored_events(db, body["request_id"])[body["request_id"]]
    assert row.status == "settled"
    assert row.cost_nanos == 390_000_000 + 199_000_000
    assert balance(admin, key["account_id"]) == before - 589_000_000
    # Still revoked: being charged does not bring it back.
    assert admin.get(f"/admin/v1/keys/{key['id']}").get_json()["state"] == "revoked"


# --- idempotency ---------------------------------------------------------------------------------


def test_a_repeat_in_another_request_is_a_duplicate_and_charged_once(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin, credit="10")
    body = event(
        key,
        usage=CHAT_USAGE,
        input_tokens=...,
        output_tokens=...,
        occurred_at="2026-11-21T12:00:00Z",
    )
    assert report(gateway, body)["accepted"] == 1
    settled_balance = balance(admin, key["account_id"])
    first = stored_events(db, body["request_id"])[body["request_id"]]
    first_id, first_cost = first.id, first.cost_nanos
    assert first_cost

    before = count(db)
    for repeat in (
        body,
        {**body, "occurred_at": "2026-11-21T20:00:00+08:00"},  # the same instant
        {**body, "api_key": None, "key_id": key["id"]},  # the same key, named by id
    ):
        repeat = {k: v for k, v in repeat.items() if v is not None}
        assert report(gateway, repeat) == {
            "object": "usage_report",
            "accepted": 0,
            "duplicates": 1,
            "rejected": [],
        }
        assert report(gateway, {"events": [repeat]})["duplicates"] == 1
    assert count(db) == before
    again = stored_events(db, body["request_id"])[body["request_id"]]
    assert (again.id, again.cost_nanos) == (first_id, first_cost)
    assert balance(admin, key["account_id"]) == settled_balance


def test_a_retry_that_omits_occurred_at_is_still_a_duplicate(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    body = event(key)  # no occurred_at: stored as the time of receipt
    assert report(gateway, body)["accepted"] == 1
    before = count(db)
    answer = report(gateway, body)  # received later, so another default occurred_at
    assert (answer["accepted"], answer["duplicates"], answer["rejected"]) == (0, 1, [])
    assert count(db) == before


@pytest.mark.parametrize(
    "change",
    [
        {"input_tokens": 1001},
        {"output_tokens": 201},
        {"cached_tokens": 1},
        {"model": "doubao-seed-2-0-mini"},
        {"outcome": "failed"},
        {"occurred_at": "2026-11-21T12:00:01Z"},
    ],
)
def test_the_same_request_id_with_other_content_is_a_conflict(
    admin: FlaskClient, gateway: FlaskClient, db: Session, change: dict[str, Any]
) -> None:
    key = funded_key(admin)
    body = event(key, occurred_at="2026-11-21T12:00:00Z")
    assert report(gateway, body)["accepted"] == 1
    before = count(db)

    error = assert_error(
        gateway.post(USAGE, json={**body, **change}), 409, "request_id_conflict", "request_id"
    )
    assert body["request_id"] in error["message"]

    good = event(key)
    answer = report(gateway, {"events": [good, {**body, **change}]})
    assert answer["accepted"] == 1
    assert answer["duplicates"] == 0
    [rejected] = answer["rejected"]
    assert rejected["index"] == 1
    assert rejected["request_id"] == body["request_id"]
    assert rejected["error"]["code"] == "request_id_conflict"
    assert rejected["error"]["param"] == "events[1].request_id"
    assert "events[1].request_id" in rejected["error"]["message"]

    assert count(db) == before + 1
    row = stored_events(db, body["request_id"])[body["request_id"]]
    assert counts(row) == (1000, 0, 200, 0)  # the first report stands
    assert row.model == "doubao-seed-2-0-lite"


def test_another_key_reusing_a_request_id_is_a_conflict(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    first, second = funded_key(admin), funded_key(admin)
    body = event(first, occurred_at="2026-11-21T12:00:00Z")
    assert report(gateway, body)["accepted"] == 1
    assert_error(
        gateway.post(USAGE, json={**body, "api_key": second["key"]}), 409, "request_id_conflict"
    )
    assert stored_events(db, body["request_id"])[body["request_id"]].key_id == first["id"]


def test_the_same_request_id_twice_in_one_batch(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    same = event(key, occurred_at="2026-11-21T12:00:00Z")
    other = event(key, occurred_at="2026-11-21T12:00:00Z")
    before = count(db)
    answer = report(gateway, {"events": [same, dict(same), other, {**other, "input_tokens": 5}]})
    assert answer["accepted"] == 2
    assert answer["duplicates"] == 1
    [rejected] = answer["rejected"]
    assert (rejected["index"], rejected["request_id"]) == (3, other["request_id"])
    assert rejected["error"]["code"] == "request_id_conflict"
    assert rejected["error"]["param"] == "events[3].request_id"
    assert count(db) == before + 2
    rows = stored_events(db, same["request_id"], other["request_id"])
    assert counts(rows[other["request_id"]]) == (1000, 0, 200, 0)  # the first of the two stands
