"""billing_litellm.refusals and errors: what a client is answered, with the billing code."""

from __future__ import annotations

import datetime as dt

import pytest

from billing_litellm.errors import BillingRefusal
from billing_litellm.refusals import (
    DECISION_HEADER,
    Refusal,
    from_billing,
    from_key_state,
    seconds_to_next_month,
)

INSUFFICIENT = {
    "error": {
        "message": "Your balance is insufficient. Please top up your account.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_balance",
    }
}


def test_a_billing_refusal_is_relayed_with_its_code_and_retry_after() -> None:
    refusal = from_billing(429, {"error": {"code": "rate_limit_exceeded"}}, {"retry-after": "7"})
    assert (refusal.status, refusal.code, refusal.headers) == (
        429,
        "rate_limit_exceeded",
        {"Retry-After": "7"},
    )
    refusal = from_billing(402, INSUFFICIENT, {})
    assert refusal.error() == INSUFFICIENT["error"]
    assert refusal.headers == {}


def test_litellm_renders_the_billing_code_not_the_status() -> None:
    exc = BillingRefusal(from_billing(402, INSUFFICIENT, {}))
    assert exc.code == "402"  # LiteLLM answers at this status
    assert exc.to_dict() == INSUFFICIENT["error"]
    hold = Refusal(
        402,
        "at most 812 output tokens",
        "invalid_request_error",
        "hold_exceeds_available",
        param="max_output_tokens",
    )
    assert BillingRefusal(hold).to_dict()["param"] == "max_output_tokens"


@pytest.mark.parametrize(
    ("state", "status", "code"),
    [
        ("revoked", 401, "invalid_api_key"),
        ("expired", 401, "invalid_api_key"),
        ("suspended", 451, "content_policy_violation"),
        ("insufficient_balance", 402, "insufficient_balance"),
        ("monthly_quota_exceeded", 429, "monthly_quota_exceeded"),
    ],
)
def test_a_cached_state_is_answered_as_billing_answers_it(
    state: str, status: int, code: str
) -> None:
    now = dt.datetime(2026, 12, 31, 23, 59, 30, tzinfo=dt.UTC)
    # Before v2 events carry only the state; the answer is the same.
    for refusal in (
        from_key_state(state, status, code, now=now),
        from_key_state(state, None, None, now=now),
    ):
        assert (refusal.status, refusal.code) == (status, code)
        assert refusal.headers[DECISION_HEADER] == "key-state-cache"
        assert ("Retry-After" in refusal.headers) is (status == 429)
    if status == 429:
        assert refusal.headers["Retry-After"] == "30"


def test_seconds_to_next_month() -> None:
    assert seconds_to_next_month(dt.datetime(2026, 2, 28, 0, 0, tzinfo=dt.UTC)) == 86_400
    assert seconds_to_next_month(dt.datetime(2026, 12, 31, 23, 59, 59, 500_000, tzinfo=dt.UTC)) == 1
