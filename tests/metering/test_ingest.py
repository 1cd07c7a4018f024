"""Usage ingest over POST /gateway/v1/usage: both usage shapes, batches where bad items never sink
good ones, idempotency by request id, and every way an item is refused (DESIGN 4 and 6.2)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.metering.usage_events import UsageEvent
from tests.support import assert_error

USAGE = "/gateway/v1/usage"

# Seed 002's Responses API usage, and the same numbers in the Chat Completions shape.
RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 88,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 230,
    "output_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}
CHAT_USAGE: dict[str, Any] = {
    "prompt_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 1000},
    "completion_tokens": 300,
    "completion_tokens_details": {"reasoning_tokens": 120},
    "total_tokens": 1500,
}


def new_key(admin: FlaskClient, credit: str = "100") -> dict[str, Any]:
    """A key (with ``key`` and ``id``) of a fresh account credited with ``credit`` USD."""
    account_id = admin.post("/admin/v1/accounts", json={"name": "ingest"}).get_json()["id"]
    if Decimal(credit):
        response = admin.post(
            f"/admin/v1/accounts/{account_id}/adjustments",
            json={"amount_usd": credit, "reason": "test credit"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert response.status_code == 201, response.get_json()
    created = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "k"})
    assert created.status_code == 201, created.get_json()
    return created.get_json()  # type: ignore[no-any-return]


def rid() -> str:
    return f"req-{uuid.uuid4()}"


def event(key: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A valid flat-count event for ``key``; ``fields`` override or add to it."""
    base: dict[str, Any] = {
        "request_id": rid(),
        "api_key": key["key"],
        "model": "doubao-seed-2-0-lite",
        "input_tokens": 1000,
        "output_tokens": 200,
    }
    base.update(fields)
    return {name: value for name, value in base.items() if value is not ...}


def report(gateway: FlaskClient, body: Any) -> dict[str, Any]:
    response = gateway.post(USAGE, json=body)
    assert response.status_code == 202, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["object"] == "usage_report"
    assert set(answer) == {"object", "accepted", "duplicates", "rejected"}
    return answer  # type: ignore[no-any-return]


def stored(db: Session, *request_ids: str) -> dict[str, UsageEvent]:
    db.expire_all()
    rows = db.scalars(select(UsageEvent).where(UsageEvent.request_id.in_(request_ids)))
    return {row.request_id: row for row in rows}


def count(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(UsageEvent)) or 0


def counts(row: UsageEvent) -> tuple[int, int, int, int]:
    return (row.input_tokens, row.cached_tokens, row.output_tokens, row.reasoning_tokens)


def balance_nanos(admin: FlaskClient, account_id: str) -> int:
    body = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    return int(Decimal(body["balance_usd"]) * 10**9)


# --- one event -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [(CHAT_USAGE, (1200, 1000, 300, 120)), (RESPONSES_USAGE, (88, 0, 230, 211))],
    ids=["chat_completions", "responses"],
)
def test_a_single_event_with_a_usage_object_is_accepted_and_normalised(
    admin: FlaskClient, gateway: FlaskClient, db: Session, usage: dict[str, Any], expected: Any
) -> None:
    key = new_key(admin)
    occurred = "2026-11-20T08:30:00Z"
    body = event(key, usage=usage, input_tokens=..., output_tokens=..., occurred_at=occurred)
    assert report(gateway, body) == {
        "object": "usage_report",
        "accepted": 1,
        "duplicates": 0,
        "rejected": [],
    }
    row = stored(db, body["request_id"])[body["request_id"]]
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
    key = new_key(admin)
    full = event(key, input_tokens=500, cached_tokens=100, output_tokens=50, reasoning_tokens=7)
    minimal = event(key, input_tokens=40, output_tokens=3)  # cached and reasoning default to 0
    for body in (full, minimal):
        assert report(gateway, body)["accepted"] == 1
    rows = stored(db, full["request_id"], minimal["request_id"])
    assert counts(rows[full["request_id"]]) == (500, 100, 50, 7)
    assert counts(rows[minimal["request_id"]]) == (40, 0, 3, 0)
    assert rows[full["request_id"]].usage_raw is None


def test_an_event_may_name_its_key_by_id(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    body = event(key, api_key=..., key_id=key["id"])
    assert report(gateway, body)["accepted"] == 1
    row = stored(db, body["request_id"])[body["request_id"]]
    assert (row.key_id, row.account_id) == (key["id"], key["account_id"])


def test_omitted_occurred_at_is_the_time_of_receipt(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    before = dt.datetime.now(dt.UTC)
    body = event(key)
    assert report(gateway, body)["accepted"] == 1
    after = dt.datetime.now(dt.UTC)
    row = stored(db, body["request_id"])[body["request_id"]]
    assert before <= row.occurred_at <= after
    assert row.occurred_at == row.received_at


def test_occurred_at_is_stored_in_utc_whatever_the_offset(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    body = event(key, occurred_at="2026-11-20T10:00:00+08:00")
    assert report(gateway, body)["accepted"] == 1
    row = stored(db, body["request_id"])[body["request_id"]]
    assert row.occurred_at == dt.datetime(2026, 11, 20, 2, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize("outcome", ["completed", "failed", "client_disconnected"])
def test_every_outcome_is_accepted_and_stored(
    admin: FlaskClient, gateway: FlaskClient, db: Session, outcome: str
) -> None:
    key = new_key(admin)
    body = event(key, outcome=outcome)
    assert report(gateway, body)["accepted"] == 1
    assert stored(db, body["request_id"])[body["request_id"]].outcome == outcome


def test_an_event_of_a_revoked_key_is_still_accepted_and_charged(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin, credit="10")
    revoked = admin.post(f"/admin/v1/keys/{key['id']}/revoke")
    assert revoked.status_code == 200 and revoked.get_json()["state"] == "revoked"
    before = balance_nanos(admin, key["account_id"])
    # lite costs 0.39 USD per M input and 1.99 USD per M output tokens: 1M input tokens are
    # 390_000_000 nano-USD, 100k output tokens 199_000_000.
    body = event(key, input_tokens=1_000_000, output_tokens=100_000)
    assert report(gateway, body)["accepted"] == 1
    row = stored(db, body["request_id"])[body["request_id"]]
    assert row.status == "settled"
    assert row.cost_nanos == 390_000_000 + 199_000_000
    assert balance_nanos(admin, key["account_id"]) == before - 589_000_000
    # Still revoked: being charged does not bring it back.
    assert admin.get(f"/admin/v1/keys/{key['id']}").get_json()["state"] == "revoked"


# --- batches -------------------------------------------------------------------------------------


def test_a_batch_keeps_the_good_items_and_names_the_field_of_each_bad_one(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    good_chat = event(key, usage=CHAT_USAGE, input_tokens=..., output_tokens=...)
    good_responses = event(key, usage=RESPONSES_USAGE, input_tokens=..., output_tokens=...)
    good_flat = event(key, input_tokens=7, output_tokens=9)
    bad_cached = event(
        key,
        input_tokens=...,
        output_tokens=...,
        usage={**CHAT_USAGE, "prompt_tokens_details": {"cached_tokens": 1201}},
    )
    bad_reasoning = event(
        key,
        input_tokens=...,
        output_tokens=...,
        usage={**RESPONSES_USAGE, "output_tokens_details": {"reasoning_tokens": 231}},
    )
    bad_negative = event(key, output_tokens=-1)
    bad_float = event(key, input_tokens=10.0)
    bad_total = event(
        key,
        input_tokens=...,
        output_tokens=...,
        usage={**RESPONSES_USAGE, "total_tokens": 88 + 230 + 211},  # reasoning added on top
    )
    bad_huge = event(key, input_tokens=10**12)
    bad_missing_model = event(key, model=...)
    bad_no_usage = event(key, input_tokens=..., output_tokens=...)
    items: list[Any] = [
        good_chat,  # 0
        bad_cached,  # 1
        bad_reasoning,  # 2
        good_responses,  # 3
        bad_negative,  # 4
        bad_float,  # 5
        bad_total,  # 6
        bad_huge,  # 7
        42,  # 8: not an object
        bad_missing_model,  # 9
        bad_no_usage,  # 10
        good_flat,  # 11
    ]
    before = count(db)
    answer = report(gateway, {"events": items})
    assert answer["accepted"] == 3
    assert answer["duplicates"] == 0
    expected = [
        (1, bad_cached, "invalid_usage", "events[1].usage.prompt_tokens_details.cached_tokens"),
        (
            2,
            bad_reasoning,
            "invalid_usage",
            "events[2].usage.output_tokens_details.reasoning_tokens",
        ),
        (4, bad_negative, "invalid_usage", "events[4].output_tokens"),
        (5, bad_float, "invalid_usage", "events[5].input_tokens"),
        (6, bad_total, "invalid_usage", "events[6].usage.total_tokens"),
        (7, bad_huge, "invalid_usage", "events[7].input_tokens"),
        (8, None, "invalid_request", "events[8]"),
        (9, bad_missing_model, "invalid_request", "events[9].model"),
        (10, bad_no_usage, "invalid_request", "events[10].usage"),
    ]
    assert [item["index"] for item in answer["rejected"]] == [index for index, *_ in expected]
    for item, (index, body, code, param) in zip(answer["rejected"], expected, strict=True):
        assert set(item) == {"index", "request_id", "error"}
        assert item["request_id"] == (body["request_id"] if body else None), index
        assert item["error"]["code"] == code, item
        assert item["error"]["param"] == param, item
        assert param in item["error"]["message"], item

    assert count(db) == before + 3
    good = [good_chat, good_responses, good_flat]
    rows = stored(db, *(body["request_id"] for body in items if isinstance(body, dict)))
    assert set(rows) == {body["request_id"] for body in good}
    assert counts(rows[good_chat["request_id"]]) == (1200, 1000, 300, 120)
    assert counts(rows[good_responses["request_id"]]) == (88, 0, 230, 211)
    assert counts(rows[good_flat["request_id"]]) == (7, 0, 9, 0)


def test_an_empty_batch_is_accepted_as_nothing(gateway: FlaskClient, db: Session) -> None:
    before = count(db)
    assert report(gateway, {"events": []}) == {
        "object": "usage_report",
        "accepted": 0,
        "duplicates": 0,
        "rejected": [],
    }
    assert count(db) == before


def test_a_batch_of_exactly_the_limit_is_accepted(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    before = count(db)
    answer = report(gateway, {"events": [event(key, input_tokens=1) for _ in range(1000)]})
    assert (answer["accepted"], answer["rejected"]) == (1000, [])
    assert count(db) == before + 1000


def test_more_than_1000_events_are_refused_and_nothing_is_stored(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    before = count(db)
    response = gateway.post(USAGE, json={"events": [event(key) for _ in range(1001)]})
    error = assert_error(response, 400, "invalid_request", "events")
    assert "1000" in error["message"]
    assert count(db) == before


@pytest.mark.parametrize("events", [{}, "events", 3, None, {"request_id": "x"}])
def test_events_that_is_not_a_list_is_refused(
    gateway: FlaskClient, db: Session, events: Any
) -> None:
    before = count(db)
    assert_error(gateway.post(USAGE, json={"events": events}), 400, "invalid_request", "events")
    assert count(db) == before


@pytest.mark.parametrize("body", [[], [{"request_id": "x"}], "usage", 7, None, True])
def test_a_body_that_is_not_an_object_is_refused(
    gateway: FlaskClient, db: Session, body: Any
) -> None:
    before = count(db)
    error = assert_error(gateway.post(USAGE, json=body), 400, "invalid_request")
    assert "object" in error["message"]
    assert count(db) == before


def test_a_body_that_is_not_json_is_refused(gateway: FlaskClient, db: Session) -> None:
    before = count(db)
    for data, content_type in (("{not json", "application/json"), ("a=b", "text/plain")):
        response = gateway.post(USAGE, data=data, content_type=content_type)
        assert_error(response, 400, "invalid_json")
    assert count(db) == before


# --- a single invalid event is answered with its error, and nothing is stored --------------------


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        (
            {"usage": {**CHAT_USAGE, "prompt_tokens_details": {"cached_tokens": 5000}}},
            "invalid_usage",
            "usage.prompt_tokens_details.cached_tokens",
        ),
        (
            {"input_tokens": 10, "reasoning_tokens": 1, "output_tokens": 0},
            "invalid_usage",
            "reasoning_tokens",
        ),
        ({"input_tokens": "10"}, "invalid_usage", "input_tokens"),
        ({"usage": "lots"}, "invalid_request", "usage"),
        ({"usage": CHAT_USAGE, "input_tokens": 10}, "invalid_request", "usage"),
        ({"model": ""}, "invalid_request", "model"),
        ({"request_id": None}, "invalid_request", "request_id"),
        ({"request_id": "x" * 201}, "invalid_request", "request_id"),
        ({"outcome": "timeout"}, "invalid_request", "outcome"),
        ({"occurred_at": "2026-11-20T10:00:00"}, "invalid_request", "occurred_at"),
        ({"api_key": "sk-" + "A" * 48}, "invalid_api_key", "api_key"),
        ({"api_key": None, "key_id": "key_nope"}, "invalid_api_key", "key_id"),
    ],
)
def test_a_single_invalid_event_is_a_400_naming_the_field_and_stores_nothing(
    admin: FlaskClient,
    gateway: FlaskClient,
    db: Session,
    fields: dict[str, Any],
    code: str,
    param: str,
) -> None:
    key = new_key(admin)
    body = event(key, **fields)
    if "usage" in fields:
        body = {k: v for k, v in body.items() if k not in ("input_tokens", "output_tokens")}
        body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    before = count(db)
    assert_error(gateway.post(USAGE, json=body), 400, code, param)
    assert count(db) == before


# --- idempotency ---------------------------------------------------------------------------------


def test_a_repeat_in_another_request_is_a_duplicate_and_charged_once(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin, credit="10")
    body = event(
        key,
        usage=CHAT_USAGE,
        input_tokens=...,
        output_tokens=...,
        occurred_at="2026-11-21T12:00:00Z",
    )
    assert report(gateway, body)["accepted"] == 1
    balance = balance_nanos(admin, key["account_id"])
    first = stored(db, body["request_id"])[body["request_id"]]
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
    again = stored(db, body["request_id"])[body["request_id"]]
    assert (again.id, again.cost_nanos) == (first_id, first_cost)
    assert balance_nanos(admin, key["account_id"]) == balance


def test_a_retry_that_omits_occurred_at_is_still_a_duplicate(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
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
    key = new_key(admin)
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
    row = stored(db, body["request_id"])[body["request_id"]]
    assert counts(row) == (1000, 0, 200, 0)  # the first report stands
    assert row.model == "doubao-seed-2-0-lite"


def test_another_key_reusing_a_request_id_is_a_conflict(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    first, second = new_key(admin), new_key(admin)
    body = event(first, occurred_at="2026-11-21T12:00:00Z")
    assert report(gateway, body)["accepted"] == 1
    assert_error(
        gateway.post(USAGE, json={**body, "api_key": second["key"]}), 409, "request_id_conflict"
    )
    assert stored(db, body["request_id"])[body["request_id"]].key_id == first["id"]


def test_the_same_request_id_twice_in_one_batch(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
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
    rows = stored(db, same["request_id"], other["request_id"])
    assert counts(rows[other["request_id"]]) == (1000, 0, 200, 0)  # the first of the two stands


# --- occurred_at, keys, outcomes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "occurred_at",
    [
        "2026-11-20T10:00:00",  # naive: no offset
        "yesterday",
        "",
        "2026-13-01T00:00:00Z",
        1763800000,
        {"at": "2026-11-20T10:00:00Z"},
        "far future",
    ],
)
def test_a_bad_occurred_at_is_rejected_naming_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session, occurred_at: Any
) -> None:
    key = new_key(admin)
    if occurred_at == "far future":
        occurred_at = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    bad = event(key, occurred_at=occurred_at)
    good = event(key)
    before = count(db)
    answer = report(gateway, {"events": [good, bad]})
    assert answer["accepted"] == 1
    [rejected] = answer["rejected"]
    assert (rejected["index"], rejected["request_id"]) == (1, bad["request_id"])
    assert rejected["error"]["param"] == "events[1].occurred_at"
    assert "events[1].occurred_at" in rejected["error"]["message"]
    assert count(db) == before + 1
    assert set(stored(db, good["request_id"], bad["request_id"])) == {good["request_id"]}


def test_a_slightly_future_occurred_at_is_clock_skew_and_accepted(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    moment = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)).replace(microsecond=0)
    body = event(key, occurred_at=moment.isoformat())
    assert report(gateway, body)["accepted"] == 1
    assert stored(db, body["request_id"])[body["request_id"]].occurred_at == moment


def test_an_unknown_key_is_rejected_and_the_rest_is_kept(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    unknown_secret = event(key, api_key="sk-" + "Z" * 48)
    unknown_id = event(key, api_key=..., key_id="key_0000000000000000000000")
    not_a_key = event(key, api_key="hello")
    good = event(key)
    answer = report(gateway, {"events": [unknown_secret, good, unknown_id, not_a_key]})
    assert answer["accepted"] == 1
    assert [
        (item["index"], item["request_id"], item["error"]["code"], item["error"]["param"])
        for item in answer["rejected"]
    ] == [
        (0, unknown_secret["request_id"], "invalid_api_key", "events[0].api_key"),
        (2, unknown_id["request_id"], "invalid_api_key", "events[2].key_id"),
        (3, not_a_key["request_id"], "invalid_api_key", "events[3].api_key"),
    ]
    ids = [body["request_id"] for body in (unknown_secret, good, unknown_id, not_a_key)]
    assert set(stored(db, *ids)) == {good["request_id"]}


def test_api_key_and_key_id_both_or_neither_are_rejected(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    both = event(key, key_id=key["id"])
    neither = event(key, api_key=...)
    good = event(key)
    answer = report(gateway, {"events": [both, neither, good]})
    assert answer["accepted"] == 1
    assert [(item["index"], item["request_id"]) for item in answer["rejected"]] == [
        (0, both["request_id"]),
        (1, neither["request_id"]),
    ]
    for item in answer["rejected"]:
        param = f"events[{item['index']}].api_key"
        assert item["error"]["param"] == param
        assert param in item["error"]["message"]
        assert "key_id" in item["error"]["message"]
    assert set(stored(db, both["request_id"], neither["request_id"], good["request_id"])) == {
        good["request_id"]
    }


def test_an_unknown_outcome_is_rejected_naming_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    bad, good = event(key, outcome="timeout"), event(key, outcome="failed")
    answer = report(gateway, {"events": [bad, good]})
    assert answer["accepted"] == 1
    [rejected] = answer["rejected"]
    assert rejected["index"] == 0
    assert rejected["error"]["param"] == "events[0].outcome"
    for outcome in ("completed", "failed", "client_disconnected"):
        assert outcome in rejected["error"]["message"]
    assert stored(db, good["request_id"])[good["request_id"]].outcome == "failed"


# --- JSON at the edges of what parsers take ------------------------------------------------------


def test_a_count_beyond_64_bits_is_refused_by_name(
    gateway: FlaskClient, admin: FlaskClient, db: Session
) -> None:
    # Valid JSON that some fast parsers refuse or turn into a float; it must be judged exactly.
    key = new_key(admin)
    body = (
        f'{{"request_id": "{rid()}", "api_key": "{key["key"]}", "model": "doubao-seed-2-0-lite",'
        ' "input_tokens": 100000000000000000000000, "output_tokens": 5}'
    )
    response = gateway.post(USAGE, data=body, content_type="application/json")
    error = assert_error(response, 400, "invalid_usage", "input_tokens")
    assert "exceeds the limit" in error["message"]


def test_a_huge_integer_in_an_ignored_usage_field_is_kept_in_the_raw_report(
    gateway: FlaskClient, admin: FlaskClient, db: Session
) -> None:
    key = new_key(admin)
    request_id = rid()
    body = (
        f'{{"request_id": "{request_id}", "api_key": "{key["key"]}",'
        ' "model": "doubao-seed-2-0-lite", "usage": {"prompt_tokens": 10,'
        ' "completion_tokens": 2, "audio_tokens": 100000000000000000000000}}'
    )
    response = gateway.post(USAGE, data=body, content_type="application/json")
    assert response.status_code == 202, response.get_data(as_text=True)
    row = stored(db, request_id)[request_id]
    assert row.usage_raw is not None and row.usage_raw["audio_tokens"] == 10**23
    assert counts(row) == (10, 0, 2, 0)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(gateway: FlaskClient, db: Session, constant: str) -> None:
    before = count(db)
    body = f'{{"request_id": "{rid()}", "key_id": "k", "model": "m", "input_tokens": {constant}}}'
    response = gateway.post(USAGE, data=body, content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert count(db) == before
