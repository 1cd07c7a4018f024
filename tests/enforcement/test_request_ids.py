"""Request ids are conflict-checked everywhere (issue #12): a repeated authorize answers its hold
only for the same key and parameters, else 409; usage under another key's open hold is
rejected in its item. On PostgreSQL and on Redis alike."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.enforcement.conftest import Edge
from tests.enforcement.support import (
    LITE,
    UNLIMITED,
    account_amounts,
    authorize,
    new_account,
    rid,
    worst_case,
)
from tests.support import assert_error, new_key

FIRST: dict[str, Any] = {"input_tokens": 100, "input_bytes": 300, "max_output_tokens": 1000}


def test_the_same_request_again_answers_the_same_hold(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    first = authorize(edge, key["key"], request_id=request_id, **FIRST).get_json()
    again = authorize(edge, key["key"], request_id=request_id, **FIRST)
    assert again.status_code == 200
    body = again.get_json()
    for field in ("hold_id", "hold_usd", "max_output_tokens", "clipped", "key_id"):
        assert body[field] == first[field], field
    assert account_amounts(edge, account_id)[1] == worst_case(300, 1000)


def test_a_clipped_hold_is_answered_again_even_with_nothing_left(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0.01")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    first = authorize(edge, key["key"], request_id=request_id).get_json()
    assert first["clipped"] is True
    assert_error(authorize(edge, key["key"]), 402, "hold_exceeds_available")
    # The retry of the request that took the balance is that request, not a new one.
    again = authorize(edge, key["key"], request_id=request_id).get_json()
    assert (again["hold_id"], again["max_output_tokens"], again["clipped"]) == (
        first["hold_id"],
        first["max_output_tokens"],
        True,
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"model": "doubao-seed-2-0-mini"},
        {"max_output_tokens": 30_000},
        {"max_output_tokens": None},
        {"input_tokens": 101},
        {"input_bytes": 299},
        {"clip": False},
    ],
    ids=lambda changed: ",".join(f"{name}={value}" for name, value in changed.items()),
)
def test_the_same_request_id_with_other_parameters_is_a_conflict(
    edge: Edge, changed: dict[str, Any]
) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    first = authorize(edge, key["key"], request_id=request_id, **FIRST).get_json()
    conflict = authorize(edge, key["key"], request_id=request_id, **(FIRST | changed))
    error = assert_error(conflict, 409, "request_id_conflict", "request_id")
    assert error["type"] == "invalid_request_error"
    assert request_id in error["message"]
    # Nothing more is held; the first hold stands.
    assert account_amounts(edge, account_id)[1] == Decimal(first["hold_usd"])


def test_another_keys_request_id_is_a_conflict(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    holder = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    sibling = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    stranger = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit=UNLIMITED)
    request_id = rid()
    assert authorize(edge, holder["key"], request_id=request_id, **FIRST).status_code == 200
    for other in (sibling, stranger):
        conflict = authorize(edge, other["key"], request_id=request_id, **FIRST)
        assert_error(conflict, 409, "request_id_conflict", "request_id")


def usage(key: dict[str, Any], request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "key_id": key["id"],
        "model": LITE,
        "input_tokens": 50,
        "output_tokens": 60,
    }


def test_usage_under_another_keys_hold_is_rejected_in_its_item(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    holder = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    other = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit=UNLIMITED)
    held = rid()
    assert authorize(edge, holder["key"], request_id=held, **FIRST).status_code == 200

    fine = usage(other, rid())
    batch = edge.gateway.post("/gateway/v1/usage", json={"events": [fine, usage(other, held)]})
    assert batch.status_code == 202, batch.get_json()
    answer = batch.get_json()
    assert answer["accepted"] == 1
    [rejected] = answer["rejected"]
    assert (rejected["index"], rejected["request_id"]) == (1, held)
    assert rejected["error"]["code"] == "request_id_conflict"
    assert rejected["error"]["param"] == "events[1].request_id"

    single = edge.gateway.post("/gateway/v1/usage", json=usage(other, held))
    assert_error(single, 409, "request_id_conflict", "request_id")

    # The holder's own usage is accepted, settles, and releases the hold.
    own = edge.gateway.post("/gateway/v1/usage", json=usage(holder, held))
    assert own.status_code == 202 and own.get_json()["accepted"] == 1
    edge.runtime.settle_pending()
    balance, held_now, _ = account_amounts(edge, account_id)
    assert (balance, held_now) == (10 - worst_case(50, 60), Decimal(0))
