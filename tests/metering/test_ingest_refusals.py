"""Usage items ingest refuses, each named by its field: an invalid single event (a 400 that
stores nothing), bad occurred_at, keys and outcomes within a batch, and JSON at the edges of
what parsers take (DESIGN 4 and 6.2)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from tests.metering.support import (
    CHAT_USAGE,
    USAGE,
    balance,
    count,
    counts,
    event,
    funded_key,
    new_account,
    report,
    rid,
    stored_events,
)
from tests.support import assert_error, new_key

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
        ({"model": "lite\u0000"}, "invalid_request", "model"),
        ({"request_id": "r\u0000"}, "invalid_request", "request_id"),
        ({"usage": {**CHAT_USAGE, "note\u0000": 1}}, "invalid_request", "usage"),
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
    key = funded_key(admin)
    body = event(key, **fields)
    if "usage" in fields:
        body = {k: v for k, v in body.items() if k not in ("input_tokens", "output_tokens")}
        body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    before = count(db)
    assert_error(gateway.post(USAGE, json=body), 400, code, param)
    assert count(db) == before


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
        "0001-01-01T00:00:00Z",  # parked as unpriced for ever, before there was a bound
        "0001-01-01T00:00:00+01:00",  # its UTC time is before year 1
    ],
)
def test_a_bad_occurred_at_is_rejected_naming_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session, occurred_at: Any
) -> None:
    key = funded_key(admin)
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
    assert set(stored_events(db, good["request_id"], bad["request_id"])) == {good["request_id"]}


def test_no_bad_item_sinks_its_batch_and_the_good_ones_are_charged(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    # Each of these answered 500 for the whole batch once, and the valid events were lost.
    account_id = new_account(admin, "100")
    key = new_key(admin, account_id)
    good = [event(key), event(key)]
    bad = [
        event(key, model="doubao-seed-2-0-lite\u0000"),
        event(key, occurred_at="0001-01-01T00:00:00+01:00"),
        event(key, occurred_at="0001-01-01T00:00:00Z"),
        {
            **{k: v for k, v in event(key).items() if k not in ("input_tokens", "output_tokens")},
            "usage": {**CHAT_USAGE, "id": "chatcmpl-\u0000"},
        },
    ]
    answer = report(gateway, {"events": [good[0], *bad, good[1]]})
    assert answer["accepted"] == 2
    assert [(item["index"], item["error"]["param"]) for item in answer["rejected"]] == [
        (1, "events[1].model"),
        (2, "events[2].occurred_at"),
        (3, "events[3].occurred_at"),
        (4, "events[4].usage"),
    ]
    assert all(item["error"]["type"] == "invalid_request_error" for item in answer["rejected"])
    stored = stored_events(db, *(item["request_id"] for item in [*good, *bad]))
    assert set(stored) == {item["request_id"] for item in good}
    # Settled in-process on the embedded default: the valid events are charged, and only they.
    charged = sum(row.cost_nanos or 0 for row in stored.values())
    assert charged > 0
    assert balance(admin, account_id) == 100 * 10**9 - charged


def test_a_slightly_future_occurred_at_is_clock_skew_and_accepted(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    moment = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)).replace(microsecond=0)
    body = event(key, occurred_at=moment.isoformat())
    assert report(gateway, body)["accepted"] == 1
    assert stored_events(db, body["request_id"])[body["request_id"]].occurred_at == moment


def test_an_unknown_key_is_rejected_and_the_rest_is_kept(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
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
    assert set(stored_events(db, *ids)) == {good["request_id"]}


def test_api_key_and_key_id_both_or_neither_are_rejected(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
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
    assert set(
        stored_events(db, both["request_id"], neither["request_id"], good["request_id"])
    ) == {good["request_id"]}


def test_an_unknown_outcome_is_rejected_naming_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    bad, good = event(key, outcome="timeout"), event(key, outcome="failed")
    answer = report(gateway, {"events": [bad, good]})
    assert answer["accepted"] == 1
    [rejected] = answer["rejected"]
    assert rejected["index"] == 0
    assert rejected["error"]["param"] == "events[0].outcome"
    for outcome in ("completed", "failed", "client_disconnected"):
        assert outcome in rejected["error"]["message"]
    assert stored_events(db, good["request_id"])[good["request_id"]].outcome == "failed"


# --- JSON at the edges of what parsers take ------------------------------------------------------


def test_a_count_beyond_64_bits_is_refused_by_name(
    gateway: FlaskClient, admin: FlaskClient, db: Session
) -> None:
    # Valid JSON that some fast parsers refuse or turn into a float; it must be judged exactly.
    key = funded_key(admin)
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
    key = funded_key(admin)
    request_id = rid()
    body = (
        f'{{"request_id": "{request_id}", "api_key": "{key["key"]}",'
        ' "model": "doubao-seed-2-0-lite", "usage": {"prompt_tokens": 10,'
        ' "completion_tokens": 2, "audio_tokens": 100000000000000000000000}}'
    )
    response = gateway.post(USAGE, data=body, content_type="application/json")
    assert response.status_code == 202, response.get_data(as_text=True)
    row = stored_events(db, request_id)[request_id]
    assert row.usage_raw is not None and row.usage_raw["audio_tokens"] == 10**23
    assert counts(row) == (10, 0, 2, 0)


@pytest.mark.parametrize(
    ("usage_extra", "refused"),
    [
        ({"id": "the text \\u0000, not a NUL"}, False),
        ({"id": "a backslash then a NUL: \\\u0000"}, True),
        ({"audio_tokens": 10**23, "id": "\u0000"}, True),  # beyond 64 bits: the slow path
        ({"choices": [{"finish_reason": "stop\u0000"}]}, True),
    ],
)
def test_only_a_real_nul_anywhere_in_usage_is_refused(
    gateway: FlaskClient, admin: FlaskClient, db: Session, usage_extra: Any, refused: bool
) -> None:
    key = funded_key(admin)
    body = {**event(key), "usage": {**CHAT_USAGE, **usage_extra}}
    body.pop("input_tokens"), body.pop("output_tokens")
    # Serialised here: the test client's JSON (orjson) refuses integers beyond 64 bits.
    response = gateway.post(
        USAGE, data=json.dumps({"events": [body]}), content_type="application/json"
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["accepted"] == (0 if refused else 1)
    assert [item["error"]["param"] for item in answer["rejected"]] == (
        ["events[0].usage"] if refused else []
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(gateway: FlaskClient, db: Session, constant: str) -> None:
    before = count(db)
    body = f'{{"request_id": "{rid()}", "key_id": "k", "model": "m", "input_tokens": {constant}}}'
    response = gateway.post(USAGE, data=body, content_type="application/json")
    assert_error(response, 400, "invalid_json")
    assert count(db) == before
