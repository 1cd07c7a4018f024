"""POST /gateway/v1/holds/{id}/release (issue #12): the gateway gives a hold back when the
upstream failed before any tokens. Idempotent, answering what became of the hold; usage
reported later still settles at its real cost; on PostgreSQL and on Redis alike."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy.orm import Session

from billing.app import create_app
from billing.core.db import utcnow
from tests.conftest import make_settings
from tests.enforcement.conftest import Edge, joined
from tests.enforcement.support import (
    UNLIMITED,
    account_amounts,
    authorize,
    new_account,
    report,
    rid,
    worst_case,
)
from tests.support import assert_error, new_key


def release(edge: Edge, hold_id: str) -> Any:
    return edge.gateway.post(f"/gateway/v1/holds/{hold_id}/release")


def test_a_released_hold_frees_its_amount_for_the_next_request(edge: Edge) -> None:
    account_id = new_account(edge.admin, "0.05")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    held = authorize(edge, key["key"], max_output_tokens=20_000).get_json()
    assert_error(
        authorize(edge, key["key"], max_output_tokens=20_000, clip=False),
        402,
        "hold_exceeds_available",
    )

    response = release(edge, held["hold_id"])
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "object": "hold",
        "id": held["hold_id"],
        "status": "released",
        "released_usd": held["hold_usd"],
    }
    assert account_amounts(edge, account_id) == (Decimal("0.05"), Decimal(0), Decimal("0.05"))
    # Authorize sees the amount back at once (on Redis: its copy of the holds).
    again = authorize(edge, key["key"], max_output_tokens=20_000, clip=False)
    assert again.status_code == 200
    assert Decimal(again.get_json()["available_usd"]) == Decimal("0.05") - worst_case(0, 20_000)


def test_releasing_again_changes_nothing(edge: Edge) -> None:
    account_id = new_account(edge.admin, "1")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    hold_id = authorize(edge, key["key"], max_output_tokens=1000).get_json()["hold_id"]
    assert release(edge, hold_id).status_code == 200
    for _ in range(2):
        again = release(edge, hold_id)
        assert again.status_code == 200
        assert (again.get_json()["status"], again.get_json()["released_usd"]) == (
            "released",
            "0.000000000",
        )
    assert account_amounts(edge, account_id) == (Decimal(1), Decimal(0), Decimal(1))


def test_usage_reported_after_a_release_settles_at_its_real_cost(edge: Edge) -> None:
    account_id = new_account(edge.admin, "1")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    held = authorize(edge, key["key"], request_id=request_id, max_output_tokens=1000)
    assert release(edge, held.get_json()["hold_id"]).status_code == 200
    # The upstream did answer after all: what it used is charged, in full.
    report(edge, key["key"], request_id, input_tokens=500, output_tokens=3000)
    cost = worst_case(500, 3000)
    assert account_amounts(edge, account_id) == (1 - cost, Decimal(0), 1 - cost)
    status = release(edge, held.get_json()["hold_id"]).get_json()["status"]
    assert status == "released"  # what this hold became: released before its usage came


def test_a_settled_hold_answers_settled(edge: Edge) -> None:
    account_id = new_account(edge.admin, "1")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_id = rid()
    held = authorize(edge, key["key"], request_id=request_id, max_output_tokens=1000).get_json()
    report(edge, key["key"], request_id, input_tokens=10, output_tokens=20)
    answer = release(edge, held["hold_id"]).get_json()
    assert (answer["status"], answer["released_usd"]) == ("settled", "0.000000000")
    cost = worst_case(10, 20)
    assert account_amounts(edge, account_id) == (1 - cost, Decimal(0), 1 - cost)


def test_an_expired_hold_answers_expired(edge: Edge) -> None:
    account_id = new_account(edge.admin, "1")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    held = authorize(edge, key["key"], max_output_tokens=1000).get_json()
    ttl = dt.timedelta(seconds=edge.runtime.settings.hold_ttl_seconds)
    assert edge.runtime.expire_holds(now=utcnow() + ttl + dt.timedelta(seconds=1)) >= 1
    answer = release(edge, held["hold_id"]).get_json()
    assert (answer["status"], answer["released_usd"]) == ("expired", "0.000000000")


def test_an_unknown_hold_is_404(edge: Edge) -> None:
    for unknown in ("hold_0000000000000000000000", "x" * 150):
        assert_error(release(edge, unknown), 404, "hold_not_found", "hold_id")


def test_with_redis_down_holds_placed_through_postgresql_are_released(
    app: Flask, db: Session, tmp_path: Path
) -> None:
    down = create_app(make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0"))
    with joined(down, db, "redis down") as edge:
        account_id = new_account(edge.admin, "1")
        key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
        held = authorize(edge, key["key"], max_output_tokens=1000).get_json()
        answer = release(edge, held["hold_id"])
        assert answer.status_code == 200 and answer.get_json()["status"] == "released"
        assert account_amounts(edge, account_id)[1] == 0
        # A hold PostgreSQL does not know may be Redis's, which cannot answer now.
        assert_error(release(edge, "hold_0000000000000000000000"), 503, "service_unavailable")
