"""POST /gateway/v1/keys/verify (issue #12): a key's state, account, allowed models and rate
limit, with no hold and nothing counted, for the gateway's free routes; from the hot path
without PostgreSQL, and from PostgreSQL when Redis is down."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event
from sqlalchemy.orm import Session

from billing.app import create_app
from tests.conftest import make_settings
from tests.enforcement.conftest import Edge, joined
from tests.enforcement.support import (
    account_amounts,
    authorize,
    new_account,
    suspend,
)
from tests.support import assert_error, new_key

VERIFY = "/gateway/v1/keys/verify"


def verify(edge: Edge, secret: str) -> Any:
    return edge.gateway.post(VERIFY, json={"api_key": secret})


def test_an_active_key_is_described_and_nothing_is_held_or_counted(edge: Edge) -> None:
    account_id = new_account(edge.admin, "10")
    key = new_key(
        edge.admin,
        account_id,
        rate_limit="1 per 10 seconds",
        allowed_models=["doubao-seed-2-0-lite"],
    )
    for _ in range(3):
        response = verify(edge, key["key"])
        assert response.status_code == 200, response.get_json()
        assert response.get_json() == {
            "object": "key",
            "key_id": key["id"],
            "account_id": account_id,
            "state": "active",
            "http_status": 200,
            "code": None,
            "allowed_models": ["doubao-seed-2-0-lite"],
            "rate_limit": {"limit": 1, "remaining": 1, "reset_seconds": 10},
        }
    assert account_amounts(edge, account_id)[1] == 0
    # The one request the limit allows is still there to take.
    assert authorize(edge, key["key"], max_output_tokens=10).status_code == 200
    after = verify(edge, key["key"]).get_json()["rate_limit"]
    assert after["remaining"] == 0 and 1 <= after["reset_seconds"] <= 10


def test_a_key_without_limits_or_allow_list(edge: Edge) -> None:
    key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit=None)
    body = verify(edge, key["key"]).get_json()
    assert (body["allowed_models"], body["rate_limit"]) == (None, None)


def refused_key(edge: Edge, how: str) -> dict[str, Any]:
    if how == "no balance":
        return new_key(edge.admin, new_account(edge.admin, "0"))
    if how == "monthly cap reached":
        return new_key(edge.admin, new_account(edge.admin, "10"), monthly_cap_usd="0")
    key = new_key(edge.admin, new_account(edge.admin, "0"))
    suspend(edge, key["key"])
    return key


@pytest.mark.parametrize(
    ("how", "state", "status", "code"),
    [
        ("no balance", "insufficient_balance", 402, "insufficient_balance"),
        ("monthly cap reached", "monthly_quota_exceeded", 429, "monthly_quota_exceeded"),
        ("suspended", "suspended", 451, "content_policy_violation"),
    ],
)
def test_a_refused_key_is_answered_with_its_state(
    edge: Edge, how: str, state: str, status: int, code: str
) -> None:
    key = refused_key(edge, how)
    response = verify(edge, key["key"])
    assert response.status_code == 200
    body = response.get_json()
    assert (body["state"], body["http_status"], body["code"]) == (state, status, code)


@pytest.mark.parametrize("how", ["unknown", "revoked", "disabled", "expired"])
def test_a_key_that_cannot_be_used_is_401(edge: Edge, how: str) -> None:
    if how == "unknown":
        assert_error(verify(edge, "sk-" + "y" * 48), 401, "invalid_api_key")
        return
    key = new_key(edge.admin, new_account(edge.admin, "10"))
    if how == "revoked":
        assert edge.admin.post(f"/admin/v1/keys/{key['id']}/revoke").status_code == 200
    elif how == "disabled":
        patched = edge.admin.patch(f"/admin/v1/keys/{key['id']}", json={"disabled": True})
        assert patched.status_code == 200, patched.get_json()
    else:
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        patched = edge.admin.patch(
            f"/admin/v1/keys/{key['id']}", json={"expires_at": soon.isoformat()}
        )
        assert patched.status_code == 200, patched.get_json()
        verify(edge, key["key"])  # copied to Redis while it is still valid
        while dt.datetime.now(dt.UTC) <= soon:
            pass
    assert_error(verify(edge, key["key"]), 401, "invalid_api_key")


def test_a_body_without_a_key_is_400(edge: Edge) -> None:
    assert_error(edge.gateway.post(VERIFY, json={}), 400, "invalid_request", "api_key")


def test_verify_on_the_hot_path_does_not_touch_postgresql(redis_app: Flask, db: Session) -> None:
    with joined(redis_app, db, "redis") as edge:
        key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit="5 per minute")
        assert verify(edge, key["key"]).status_code == 200  # copies the key to Redis
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(args[2])

        stranger = "sk-" + uuid.uuid4().hex + "z" * 16
        engine = db.get_bind().engine  # where the requests' sessions run (see joined)
        event.listen(engine, "before_cursor_execute", count)
        try:
            known = verify(edge, key["key"])
            unknown = verify(edge, stranger)
            again = verify(edge, stranger)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert known.status_code == 200
        assert_error(again, 401, "invalid_api_key")
        assert unknown.status_code == 401
        # One lookup of the unknown secret, remembered in Redis as unknown: nothing else.
        [lookup] = [statement for statement in statements if "SAVEPOINT" not in statement]
        assert "FROM api_keys" in lookup


def test_with_redis_down_verify_answers_from_postgresql(
    app: Flask, db: Session, tmp_path: Path
) -> None:
    down = create_app(make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0"))
    with joined(down, db, "redis down") as edge:
        key = new_key(edge.admin, new_account(edge.admin, "0"), rate_limit="2 per minute")
        body = verify(edge, key["key"]).get_json()
        assert (body["state"], body["http_status"]) == ("insufficient_balance", 402)
        assert body["rate_limit"] == {"limit": 2, "remaining": 2, "reset_seconds": 60}
