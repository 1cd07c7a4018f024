"""What authorize's 200 tells the gateway besides the hold (issue #12): the key's state, its
rate limit after this request (for ``x-ratelimit-*`` headers), and its monthly cap and spend;
on PostgreSQL and on Redis alike."""

from __future__ import annotations

from decimal import Decimal

from tests.enforcement.conftest import Edge
from tests.enforcement.support import (
    UNLIMITED,
    authorize,
    new_account,
    report,
    rid,
    worst_case,
)
from tests.support import assert_error, new_key


def test_the_answer_has_every_field_of_the_contract(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit="5 per minute")
    body = authorize(edge, key["key"], max_output_tokens=100).get_json()
    assert set(body) == {
        "allow",
        "key_id",
        "account_id",
        "hold_id",
        "hold_usd",
        "available_usd",
        "expires_at",
        "max_output_tokens",
        "clipped",
        "state",
        "rate_limit",
        "monthly_cap_usd",
        "month_spend_usd",
    }
    assert body["state"] == "active"
    assert (body["monthly_cap_usd"], body["month_spend_usd"]) == (None, None)


def test_the_rate_limit_counts_down_and_says_when_a_place_frees(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit="3 per minute")
    windows = [
        authorize(edge, key["key"], max_output_tokens=10).get_json()["rate_limit"] for _ in range(3)
    ]
    assert [window["limit"] for window in windows] == [3, 3, 3]
    assert [window["remaining"] for window in windows] == [2, 1, 0]
    # The first request counted leaves the window a minute after it was made.
    assert all(58 <= window["reset_seconds"] <= 60 for window in windows)
    refused = authorize(edge, key["key"], max_output_tokens=10)
    assert_error(refused, 429, "rate_limit_exceeded")
    assert int(refused.headers["Retry-After"]) <= windows[-1]["reset_seconds"] + 1


def test_a_key_without_a_rate_limit_answers_null(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit=None)
    assert key["rate_limit"] is None  # named as none: the default limit does not apply
    body = authorize(edge, key["key"], max_output_tokens=10).get_json()
    assert body["rate_limit"] is None


def test_a_capped_key_shows_its_cap_and_settled_spend(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED, monthly_cap_usd="0.5")
    first = authorize(edge, key["key"], max_output_tokens=1000).get_json()
    assert (first["monthly_cap_usd"], first["month_spend_usd"]) == ("0.500000000", "0.000000000")
    request_id = rid()
    authorize(edge, key["key"], request_id=request_id, max_output_tokens=1000)
    report(edge, key["key"], request_id, input_tokens=100, output_tokens=200)
    later = authorize(edge, key["key"], max_output_tokens=1000).get_json()
    # Settled spend only: the open holds count against the cap, but are not spend.
    assert Decimal(later["month_spend_usd"]) == worst_case(100, 200)
    assert later["monthly_cap_usd"] == "0.500000000"
