"""Affordable holds (issue #12): a hold that does not fit what is available is clipped to the
most output tokens that do, down to HOLD_MIN_OUTPUT_TOKENS; below that the 402 says what can be
afforded; ``clip: false`` is all or nothing; ``input_bytes`` bounds the input. On PostgreSQL and
on Redis alike (the ``edge`` fixture), and the Redis script's arithmetic against Python's."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pytest
import redis
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from billing.accounts.accounts import Account
from billing.accounts.keys import ApiKey
from billing.app import create_app
from billing.catalog.pricing import HoldTerms
from billing.core.db import utcnow
from billing.core.effects import AccountSnapshot
from billing.core.settings import Settings
from billing.enforcement import hotpath, mirror
from billing.enforcement.hotpath import HoldRequest, HotPath
from tests.conftest import TEST_REDIS_URL, make_settings
from tests.enforcement.conftest import Edge, joined
from tests.enforcement.support import (
    LITE_MAX_OUTPUT,
    LITE_OUTPUT,
    MILLION,
    UNLIMITED,
    account_amounts,
    authorize,
    new_account,
    worst_case,
)
from tests.support import assert_error, key_state, new_key


def affordable(available: Decimal, input_tokens: int = 0) -> int:
    """The most lite output tokens ``available`` USD holds beside ``input_tokens``."""
    room = available - worst_case(input_tokens, 0)
    return int((room * MILLION / LITE_OUTPUT).to_integral_value(rounding=ROUND_FLOOR))


def test_a_hold_that_does_not_fit_is_clipped_to_what_is_available(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0.05")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    first = authorize(edge, key["key"], max_output_tokens=20_000).get_json()
    assert (first["max_output_tokens"], first["clipped"]) == (20_000, False)

    left = Decimal("0.05") - worst_case(0, 20_000)  # 0.0102
    response = authorize(edge, key["key"], max_output_tokens=20_000)
    assert response.status_code == 200, response.get_json()
    clipped = response.get_json()
    granted = affordable(left)
    assert granted == 5125
    assert (clipped["max_output_tokens"], clipped["clipped"]) == (granted, True)
    assert Decimal(clipped["hold_usd"]) == worst_case(0, granted)
    assert Decimal(clipped["available_usd"]) == left - worst_case(0, granted)
    assert account_amounts(edge, account_id)[1] == worst_case(0, 20_000 + granted)

    # What is left affords no output token at all.
    refused = authorize(edge, key["key"], max_output_tokens=20_000)
    error = assert_error(refused, 402, "hold_exceeds_available", "max_output_tokens")
    assert "at most 0 output tokens" in error["message"]
    assert key_state(edge.admin, key["id"]) == ("active", 200)


def test_the_clip_leaves_room_for_the_input(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "0.01"), rate_limit=UNLIMITED)
    body = authorize(edge, key["key"], input_tokens=1000).get_json()  # the model's 32768
    granted = affordable(Decimal("0.01"), input_tokens=1000)
    assert (body["max_output_tokens"], body["clipped"]) == (granted, True)
    assert Decimal(body["hold_usd"]) == worst_case(1000, granted) <= Decimal("0.01")
    assert worst_case(1000, granted + 1) > Decimal("0.01")


def test_a_hold_that_fits_covers_all_that_was_asked(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit=UNLIMITED)
    asked = authorize(edge, key["key"], max_output_tokens=777).get_json()
    assert (asked["max_output_tokens"], asked["clipped"]) == (777, False)
    default = authorize(edge, key["key"]).get_json()
    assert (default["max_output_tokens"], default["clipped"]) == (LITE_MAX_OUTPUT, False)


@pytest.mark.parametrize(
    ("asked", "status", "granted"),
    [
        (5000, 402, None),  # 201 affordable, fewer than the 256 a clip may grant
        (250, 402, None),  # asked below the minimum: the minimum is what was asked
        (201, 200, 201),  # what fits is granted whole
        (150, 200, 150),
    ],
)
def test_a_clip_grants_at_least_the_minimum(
    edge: Edge, asked: int, status: int, granted: int | None
) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "0.0004"), rate_limit=UNLIMITED)
    assert affordable(Decimal("0.0004")) == 201
    response = authorize(edge, key["key"], max_output_tokens=asked)
    if granted is None:
        error = assert_error(response, status, "hold_exceeds_available", "max_output_tokens")
        assert error["message"] == (
            "This request's hold does not fit the available balance: at most 201 output tokens"
            " can be afforded; lower max_output_tokens or top up."
        )
        assert error["type"] == "insufficient_quota"
        return
    assert response.status_code == status, response.get_json()
    assert (response.get_json()["max_output_tokens"], response.get_json()["clipped"]) == (
        granted,
        False,
    )


def test_clip_false_is_all_or_nothing(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0.05")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    refused = authorize(edge, key["key"], max_output_tokens=30_000, clip=False)
    error = assert_error(refused, 402, "hold_exceeds_available", "max_output_tokens")
    assert f"at most {affordable(Decimal('0.05'))} output tokens" in error["message"]
    assert account_amounts(edge, account_id)[1] == 0  # nothing held
    clipped = authorize(edge, key["key"], max_output_tokens=30_000).get_json()
    assert clipped["max_output_tokens"] == affordable(Decimal("0.05")) == 25_125


def test_nothing_available_is_insufficient_balance(edge: Edge) -> None:
    # $0.0398 is exactly the hold of 20,000 output tokens: nothing is left after it.
    account_id = new_account(edge.admin, "0.0398")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    assert authorize(edge, key["key"], max_output_tokens=20_000).status_code == 200
    assert account_amounts(edge, account_id)[2] == 0
    error = assert_error(
        authorize(edge, key["key"], max_output_tokens=1), 402, "insufficient_balance"
    )
    assert error["param"] is None
    # The key's state follows settled money only: the balance is untouched, so it stays active.
    assert key_state(edge.admin, key["id"]) == ("active", 200)


@pytest.mark.parametrize(
    ("input_tokens", "input_bytes", "covered"),
    [(10, 5000, 5000), (6000, 5000, 6000), (0, 0, 0), (0, 7, 7)],
)
def test_the_hold_covers_the_larger_of_input_tokens_and_input_bytes(
    edge: Edge, input_tokens: int, input_bytes: int, covered: int
) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit=UNLIMITED)
    body = authorize(
        edge,
        key["key"],
        input_tokens=input_tokens,
        input_bytes=input_bytes,
        max_output_tokens=100,
    ).get_json()
    assert Decimal(body["hold_usd"]) == worst_case(covered, 100)


def test_input_bytes_must_be_a_count(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "1"))
    for bad in (-1, "many", 10**12):
        assert_error(
            authorize(edge, key["key"], input_bytes=bad), 400, "invalid_request", "input_bytes"
        )
    assert_error(authorize(edge, key["key"], clip="maybe"), 400, "invalid_request", "clip")


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_the_minimum_grant_is_a_setting(
    app: Flask, db: Session, tmp_path: Path, backend: str
) -> None:
    redis_url = TEST_REDIS_URL if backend == "redis" else None
    configured = create_app(
        make_settings(tmp_path, redis_url=redis_url, hold_min_output_tokens=100)
    )
    with joined(configured, db, backend) as edge:
        key = new_key(edge.admin, new_account(edge.admin, "0.0004"), rate_limit=UNLIMITED)
        body = authorize(edge, key["key"], max_output_tokens=5000).get_json()
        assert (body["max_output_tokens"], body["clipped"]) == (201, True)


# The Redis script computes the clipped hold in doubles, from terms split at the nano-dollar;
# it must agree with Python's exact integers (billing.catalog.pricing.HoldTerms) everywhere.


@pytest.fixture(scope="module")
def hot(redis_settings: Settings) -> Iterator[HotPath]:
    assert redis_settings.redis_url is not None
    client = redis.Redis.from_url(redis_settings.redis_url)
    yield HotPath(client)
    client.close()


@settings(max_examples=300)
@given(
    available=st.integers(1, 2**53 // 2),
    input_femtos=st.integers(0, 10**21),
    per_token=st.integers(0, 10**13),
    asked=st.integers(1, 10**8),
    minimum=st.integers(1, 10**8),
)
def test_the_redis_script_clips_exactly_as_python(
    hot: HotPath, available: int, input_femtos: int, per_token: int, asked: int, minimum: int
) -> None:
    terms = HoldTerms(input_femtos, per_token, asked, min(minimum, asked))
    now = utcnow()
    account = Account(id=f"acct_{uuid.uuid4().hex}", balance_nanos=available, balance_version=1)
    key = ApiKey(
        id=f"key_{uuid.uuid4().hex}",
        account_id=account.id,
        key_hash=uuid.uuid4().hex,
        state="active",
        rate_limit=None,
        monthly_cap_nanos=None,
        allowed_models=None,
        expires_at=None,
    )
    hold = HoldRequest(
        key_hash=key.key_hash,
        model_id="m",
        request_id=f"req-{uuid.uuid4()}",
        hold_id=f"hold_{uuid.uuid4().hex}",
        now=now,
        expires_at=now + dt.timedelta(minutes=1),
        terms=terms,
        request_hash="h",
    )
    client = hot.client
    try:
        mirror.write(client, [key])
        hot.publish({account.id: AccountSnapshot(1, available, {})}, [])
        verdict = hot.authorize(hold)
    finally:
        hot.release(hold.request_id)
        client.delete(
            mirror.key_name(key.id),
            mirror.hash_name(key.key_hash),
            hotpath.ACCOUNT_PREFIX + account.id,
            hotpath.HOLD_RECORD + hold.hold_id,
        )
    granted = terms.grant(available)
    if granted is None:
        assert verdict.verdict == "hold_exceeds_available"
        assert verdict.affordable_tokens == (terms.most_output(available) or 0)
    else:
        assert verdict.verdict == "held"
        assert (verdict.output_tokens, verdict.amount_nanos) == granted
        assert verdict.available_nanos == available - granted[1]
