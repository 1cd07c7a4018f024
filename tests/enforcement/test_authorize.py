"""POST /gateway/v1/authorize: the state table of DESIGN section 5 with its precedence, holds
against the available balance, their release by settlement or expiry, rate limits and monthly
caps, on PostgreSQL and on Redis alike (the ``edge`` fixture runs each test on both)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from limits import parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import event
from sqlalchemy.orm import Session

from billing.app import create_app
from billing.core.db import utcnow
from billing.core.ids import keyed_hash
from billing.enforcement.authorize import seconds_to_next_month
from tests.conftest import SECRET_KEY, make_settings
from tests.enforcement.conftest import Edge, joined
from tests.enforcement.support import (
    LITE,
    LITE_MAX_OUTPUT,
    UNLIMITED,
    account_amounts,
    authorize,
    new_account,
    report,
    rid,
    suspend,
    worst_case,
)
from tests.support import assert_error, new_key


def test_allows_and_holds_the_worst_case_cost(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    response = authorize(edge, key["key"], input_tokens=1000, max_output_tokens=1000)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    hold = worst_case(1000, 1000)
    assert body["allow"] is True
    assert (body["key_id"], body["account_id"]) == (key["id"], account_id)
    assert body["hold_id"].startswith("hold_")
    assert Decimal(body["hold_usd"]) == hold == Decimal("0.00238")
    assert Decimal(body["available_usd"]) == 10 - hold
    assert account_amounts(edge, account_id) == (Decimal(10), hold, 10 - hold)


def test_without_a_maximum_the_hold_covers_the_models_max_output(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    body = authorize(edge, key["key"], input_tokens=1000).get_json()
    assert Decimal(body["hold_usd"]) == worst_case(1000, LITE_MAX_OUTPUT)


def test_repeating_a_request_id_returns_its_hold_once(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    first = authorize(edge, key["key"], request_id=request_id, max_output_tokens=100).get_json()
    again = authorize(edge, key["key"], request_id=request_id, max_output_tokens=100).get_json()
    assert again["hold_id"] == first["hold_id"]
    assert account_amounts(edge, account_id)[1] == Decimal(first["hold_usd"])


def test_a_hold_that_does_not_fit_the_available_balance_is_refused_with_402(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0.05")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    # 20,000 output tokens hold 0.0398: one fits, a second does not (0.0102 left).
    assert authorize(edge, key["key"], max_output_tokens=20_000).status_code == 200
    refused = authorize(edge, key["key"], max_output_tokens=20_000, clip=False)
    error = assert_error(refused, 402, "hold_exceeds_available", "max_output_tokens")
    # 0.0102 affords 5125 output tokens at $1.99 per million (5126 would hold 0.01020074).
    assert "at most 5125 output tokens" in error["message"]
    assert "Retry-After" not in refused.headers
    # A smaller request still fits, and the refusal changed nothing: the key stays active.
    assert authorize(edge, key["key"], max_output_tokens=5_000).status_code == 200
    assert edge.admin.get(f"/admin/v1/keys/{key['id']}").get_json()["state"] == "active"
    balance, held, available = account_amounts(edge, account_id)
    assert held == worst_case(0, 25_000) and available == balance - held


def test_settlement_releases_the_hold_and_charges_the_actual_cost(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    authorize(edge, key["key"], request_id=request_id, input_tokens=1000, max_output_tokens=1000)
    report(edge, key["key"], request_id, input_tokens=800, output_tokens=300)
    cost = worst_case(800, 300)
    assert account_amounts(edge, account_id) == (10 - cost, Decimal(0), 10 - cost)


def test_a_failed_request_with_no_usage_releases_its_hold(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    authorize(edge, key["key"], request_id=request_id, max_output_tokens=1000)
    report(
        edge, key["key"], request_id, input_tokens=0, output_tokens=0, outcome="client_disconnected"
    )
    assert account_amounts(edge, account_id) == (Decimal(10), Decimal(0), Decimal(10))


def test_an_overrun_is_charged_in_full_and_flips_the_key_to_402_at_once(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0.01")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    held = authorize(edge, key["key"], request_id=request_id, max_output_tokens=10)
    assert held.status_code == 200
    report(edge, key["key"], request_id, input_tokens=0, output_tokens=10_000)
    balance, held_now, _ = account_amounts(edge, account_id)
    assert balance == Decimal("0.01") - worst_case(0, 10_000) < 0
    assert held_now == 0
    assert edge.admin.get(f"/admin/v1/keys/{key['id']}").get_json()["state"] == (
        "insufficient_balance"
    )
    assert_error(authorize(edge, key["key"], max_output_tokens=1), 402, "insufficient_balance")


def test_holds_expire_after_their_ttl(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    authorize(edge, key["key"], max_output_tokens=1000)
    ttl = dt.timedelta(seconds=edge.runtime.settings.hold_ttl_seconds)
    assert edge.runtime.expire_holds(now=utcnow() + ttl - dt.timedelta(seconds=5)) == 0
    assert account_amounts(edge, account_id)[1] == worst_case(0, 1000)
    assert edge.runtime.expire_holds(now=utcnow() + ttl + dt.timedelta(seconds=1)) == 1
    assert account_amounts(edge, account_id) == (Decimal(10), Decimal(0), Decimal(10))


# The state table and its precedence (DESIGN section 5): the first applicable row wins.


def test_an_unknown_key_is_401(edge: Edge) -> None:
    response = authorize(edge, "sk-" + "x" * 48)
    assert_error(response, 401, "invalid_api_key")
    # Answered again from the remembered unknown hash, the same way.
    assert_error(authorize(edge, "sk-" + "x" * 48), 401, "invalid_api_key")


def test_revoked_beats_everything(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0")
    key = new_key(edge.admin, account_id, allowed_models=["doubao-seed-2-0-mini"])
    suspend(edge, key["key"])
    assert edge.admin.post(f"/admin/v1/keys/{key['id']}/revoke").status_code == 200
    assert_error(authorize(edge, key["key"], model="no-such-model"), 401, "invalid_api_key")


def test_suspended_beats_insufficient_balance(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "0"))
    suspend(edge, key["key"])
    assert_error(authorize(edge, key["key"]), 451, "content_policy_violation")


def test_insufficient_balance_beats_quota_rate_and_model(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0")
    key = new_key(
        edge.admin, account_id, monthly_cap_usd="0", allowed_models=["doubao-seed-2-0-mini"]
    )
    assert_error(authorize(edge, key["key"], model="no-such-model"), 402, "insufficient_balance")
    assert_error(authorize(edge, key["key"]), 402, "insufficient_balance")


def test_monthly_quota_counts_open_holds_and_says_when_it_resets(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, monthly_cap_usd="0.05", rate_limit=UNLIMITED)
    assert authorize(edge, key["key"], max_output_tokens=20_000).status_code == 200
    # 0.0398 is held; another 0.0398 would pass the 0.05 cap although the balance has room.
    before = utcnow()
    refused = authorize(edge, key["key"], max_output_tokens=20_000)
    error = assert_error(refused, 429, "monthly_quota_exceeded")
    assert "cap" in error["message"]
    retry_after = int(refused.headers["Retry-After"])
    assert seconds_to_next_month(before) - 5 <= retry_after <= seconds_to_next_month(before)
    assert authorize(edge, key["key"], max_output_tokens=1_000).status_code == 200


def test_quota_beats_the_rate_limit(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(edge.admin, account_id, monthly_cap_usd="0.001", rate_limit="1 per 10 seconds")
    assert authorize(edge, key["key"], max_output_tokens=100).status_code == 200
    assert_error(authorize(edge, key["key"], max_output_tokens=1000), 429, "monthly_quota_exceeded")


def test_seed_rate_limit_of_one_request_per_10_seconds(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit="1 per 10 seconds")
    assert authorize(edge, key["key"], max_output_tokens=100).status_code == 200
    refused = authorize(edge, key["key"], max_output_tokens=100)
    assert_error(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    # The refused request released the hold it would have placed.
    held = account_amounts(edge, new_key_account(edge, key))[1]
    assert held == worst_case(0, 100)


def new_key_account(edge: Edge, key: dict[str, Any]) -> str:
    account_id: str = edge.admin.get(f"/admin/v1/keys/{key['id']}").get_json()["account_id"]
    return account_id


def test_rate_limit_beats_model_checks(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(
        edge.admin,
        account_id,
        rate_limit="1 per 10 seconds",
        allowed_models=["doubao-seed-2-0-mini"],
    )
    assert authorize(edge, key["key"], model="doubao-seed-2-0-mini").status_code == 200
    assert_error(authorize(edge, key["key"], model="no-such-model"), 429, "rate_limit_exceeded")
    assert_error(authorize(edge, key["key"]), 429, "rate_limit_exceeded")


def test_model_not_allowed_is_403_and_unknown_model_400(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(
        edge.admin, account_id, rate_limit=UNLIMITED, allowed_models=["doubao-seed-2-0-mini"]
    )
    assert_error(authorize(edge, key["key"]), 403, "model_not_allowed")
    assert_error(authorize(edge, key["key"], model="no-such-model"), 400, "model_not_found")
    # An alias of an allowed model is that model.
    assert authorize(edge, key["key"], model="doubao-seed-2.0-mini").status_code == 200


@pytest.mark.parametrize(
    "refusal",
    ["unknown model", "model not allowed", "hold too large"],
)
def test_a_request_refused_for_another_reason_does_not_consume_the_rate_limit(
    edge: Edge, refusal: str
) -> None:
    account_id = new_account(edge.admin, "1")
    key = new_key(edge.admin, account_id, rate_limit="1 per 10 seconds", allowed_models=[LITE])
    refusals: dict[str, dict[str, Any]] = {
        "unknown model": {"model": "no-such-model"},
        "model not allowed": {"model": "doubao-seed-2-0-mini"},
        "hold too large": {"max_output_tokens": 10_000_000, "clip": False},
    }
    assert authorize(edge, key["key"], **refusals[refusal]).status_code in (400, 402, 403)
    assert authorize(edge, key["key"], max_output_tokens=100).status_code == 200


def test_a_top_up_lets_a_402_key_through_at_once(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    assert_error(authorize(edge, key["key"]), 402, "insufficient_balance")
    credit = edge.admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": "1", "reason": "top-up"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert credit.status_code == 201
    assert authorize(edge, key["key"], max_output_tokens=100).status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("request_id", ""),
        ("input_tokens", -1),
        ("max_output_tokens", 0),
        ("max_output_tokens", 10**12),
        ("model", None),
    ],
)
def test_bad_requests_name_the_field(edge: Edge, field: str, value: Any) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "1"))
    response = authorize(edge, key["key"], **{field: value})
    assert_error(response, 400, "invalid_request", param=field)


# Redis is a copy: losing it loses no money, and authorize does not allow everything without it.


def test_a_flushed_hot_path_is_reloaded_from_postgres(redis_app: Flask, db: Session) -> None:
    with joined(redis_app, db, "redis") as edge:
        flushed_hot_path_is_reloaded(edge)


def flushed_hot_path_is_reloaded(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0.05")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    assert authorize(edge, key["key"], max_output_tokens=20_000).status_code == 200
    client = edge.runtime.redis
    assert client is not None
    client.delete(
        f"billing:acct:{account_id}",
        f"billing:key:{key['id']}",
        f"billing:kh:{keyed_hash(SECRET_KEY.encode(), key['key'])}",
    )
    # Reloaded: the balance is PostgreSQL's; the lost hold no longer counts.
    again = authorize(edge, key["key"], max_output_tokens=20_000)
    assert again.status_code == 200
    assert Decimal(again.get_json()["available_usd"]) == Decimal("0.05") - worst_case(0, 20_000)


@pytest.mark.parametrize("when_down", ["postgres", "refuse"])
def test_with_redis_down_authorize_falls_back_to_postgres_or_refuses(
    app: Flask, db: Session, tmp_path: Path, when_down: str
) -> None:
    down = create_app(
        make_settings(
            tmp_path, redis_url="redis://127.0.0.1:1/0", authorize_when_redis_down=when_down
        )
    )
    with joined(down, db, "redis down") as edge:
        redis_down(edge, when_down)


def redis_down(edge: Edge, when_down: str) -> None:
    account_id = new_account(edge.admin, "0.05")
    key = new_key(edge.admin, account_id, rate_limit="1 per 10 seconds")
    first = authorize(edge, key["key"], max_output_tokens=20_000)
    if when_down == "refuse":
        assert_error(first, 503, "service_unavailable")
        return
    assert first.status_code == 200
    # Holds and limits still hold: the balance, then the rate limit (in this process).
    refused = authorize(edge, key["key"], max_output_tokens=20_000, clip=False)
    assert_error(refused, 402, "hold_exceeds_available")
    assert_error(authorize(edge, key["key"], max_output_tokens=1_000), 429, "rate_limit_exceeded")
    assert account_amounts(edge, account_id)[1] == worst_case(0, 20_000)


def test_the_hot_path_counts_in_the_limits_librarys_own_window(
    redis_app: Flask, db: Session, redis_settings: Any
) -> None:
    with joined(redis_app, db, "redis") as edge:
        key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit="2 per minute")
        assert authorize(edge, key["key"], max_output_tokens=100).status_code == 200
        # The library, on its own, over the same Redis, sees the request authorize counted.
        limiter = MovingWindowRateLimiter(RedisStorage(redis_settings.redis_url))
        item = parse("2 per minute")
        assert limiter.get_window_stats(item, key["id"]).remaining == 1
        assert limiter.hit(item, key["id"])  # and what it counts, authorize sees
        assert_error(authorize(edge, key["key"], max_output_tokens=100), 429, "rate_limit_exceeded")


def test_a_normal_authorize_does_not_touch_postgresql(redis_app: Flask, db: Session) -> None:
    with joined(redis_app, db, "redis") as edge:
        key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit=UNLIMITED)
        assert authorize(edge, key["key"], max_output_tokens=100).status_code == 200  # warms up
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(args[2])

        engine = db.get_bind().engine  # where the requests' sessions run (see joined)
        event.listen(engine, "before_cursor_execute", count)
        try:
            allowed = authorize(edge, key["key"], max_output_tokens=100)
            clipped = authorize(edge, key["key"], max_output_tokens=10**7)
            refused = authorize(edge, key["key"], max_output_tokens=10**8, clip=False)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert allowed.status_code == 200
        assert clipped.get_json()["clipped"] is True
        assert_error(refused, 402, "hold_exceeds_available")
        assert statements == []


def test_repeating_a_request_id_does_not_count_against_the_rate_limit_again(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit="2 per minute")
    request_id = rid()
    for _ in range(3):
        assert authorize(edge, key["key"], request_id=request_id).status_code == 200
    assert authorize(edge, key["key"]).status_code == 200  # the second of two
    assert_error(authorize(edge, key["key"]), 429, "rate_limit_exceeded")
