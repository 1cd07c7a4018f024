"""Usage ingest in batches: bad items never sink good ones, the batch size limit, and bodies
that are not a batch at all (DESIGN 4 and 6.2)."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from tests.metering.support import (
    CHAT_USAGE,
    RESPONSES_USAGE,
    USAGE,
    count,
    counts,
    event,
    funded_key,
    report,
    stored_events,
)
from tests.support import assert_error


def test_a_batch_keeps_the_good_items_and_names_the_field_of_each_bad_one(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
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
    rows = stored_events(db, *(body["request_id"] for body in items if isinstance(body, dict)))
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
    key = funded_key(admin)
    before = count(db)
    answer = report(gateway, {"events": [event(key, input_tokens=1) for _ in range(1000)]})
    assert (answer["accepted"], answer["rejected"]) == (1000, [])
    assert count(db) == before + 1000


def test_more_than_1000_events_are_refused_and_nothing_is_stored(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
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
