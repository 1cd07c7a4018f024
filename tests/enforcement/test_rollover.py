"""The monthly rollover: keys held at their monthly cap return to active when the UTC month
turns (beat re-derives them), and raising the cap does it at once (DESIGN 5, 6.6)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.accounts import keys, rollups
from billing.core.db import utcnow
from tests.enforcement.support import new_account, state_changes
from tests.support import key_state, new_key
from workers import tasks

CODE = "doubao-seed-2-0-code"  # 1_000 input tokens cost 1_490_000 nano-USD


def spend(gateway: FlaskClient, key: dict[str, Any]) -> None:
    event = {
        "request_id": f"req-{uuid.uuid4()}",
        "key_id": key["id"],
        "model": CODE,
        "input_tokens": 1_000,
        "output_tokens": 0,
    }
    response = gateway.post("/gateway/v1/usage", json=event)
    assert response.status_code == 202 and response.get_json()["accepted"] == 1, response.get_json()


def capped_out(admin: FlaskClient, gateway: FlaskClient, account_id: str) -> dict[str, Any]:
    key = new_key(admin, account_id, monthly_cap_usd="0.001")
    spend(gateway, key)
    assert key_state(admin, key["id"]) == ("monthly_quota_exceeded", 429)
    return key


def next_month(now: dt.datetime) -> dt.datetime:
    start = rollups.month_start(now)
    first = (start + dt.timedelta(days=32)).replace(day=1)
    return dt.datetime.combine(first, dt.time(0, 0, 5), tzinfo=dt.UTC)


def test_keys_at_the_monthly_cap_return_to_active_when_the_month_turns(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin)
    capped = capped_out(admin, gateway, account_id)
    other = new_key(admin, account_id)
    disabled = capped_out(admin, gateway, account_id)
    admin.patch(f"/admin/v1/keys/{disabled['id']}", json={"disabled": True})
    db.expire_all()

    # Within the month nothing changes, however often it runs.
    assert keys.refresh_quota_keys(db, now=utcnow()) == []
    assert key_state(admin, capped["id"]) == ("monthly_quota_exceeded", 429)

    turned = next_month(utcnow())
    changed = keys.refresh_quota_keys(db, now=turned)
    assert [key.id for key in changed] == [capped["id"]]
    db.flush()
    assert key_state(admin, capped["id"]) == ("active", 200)
    assert state_changes(db, capped["id"])[-1] == (
        "monthly_quota_exceeded",
        "active",
        "monthly quota reset",
    )
    assert key_state(admin, other["id"]) == ("active", 200)
    assert key_state(admin, disabled["id"]) == ("disabled", 401)
    assert keys.refresh_quota_keys(db, now=turned) == []  # idempotent


def test_the_rollover_respects_precedence(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin, credit="0.002")
    key = capped_out(admin, gateway, account_id)
    # The account is emptied by an operator; the stored state is still the cap's.
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": "-0.000510000", "reason": "test"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201
    assert key_state(admin, key["id"]) == ("insufficient_balance", 402)
    db.expire_all()
    assert keys.refresh_quota_keys(db, now=next_month(utcnow())) == []


def test_raising_the_cap_returns_a_429_key_to_active(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = capped_out(admin, gateway, new_account(admin))
    still = admin.patch(f"/admin/v1/keys/{key['id']}", json={"monthly_cap_usd": "0.00149"})
    assert still.get_json()["state"] == "monthly_quota_exceeded"  # re-derived with the spend
    raised = admin.patch(f"/admin/v1/keys/{key['id']}", json={"monthly_cap_usd": "0.002"})
    assert raised.status_code == 200, raised.get_json()
    assert (raised.get_json()["state"], raised.get_json()["http_status"]) == ("active", 200)
    assert state_changes(db, key["id"])[-1] == (
        "monthly_quota_exceeded",
        "active",
        "updated by an operator",
    )
    removed = new_key(admin, key["account_id"], monthly_cap_usd="0.001")
    spend(gateway, removed)
    uncapped = admin.patch(f"/admin/v1/keys/{removed['id']}", json={"monthly_cap_usd": None})
    assert uncapped.get_json()["state"] == "active"


def test_beat_runs_the_rollover_often(app: Flask, db: Session) -> None:
    schedule = app.extensions["celery"].conf.beat_schedule
    entry = schedule["monthly-rollover"]
    assert entry["task"] == "workers.tasks.monthly_rollover"
    assert entry["schedule"] <= 3600
    with app.app_context():
        assert tasks.monthly_rollover.run() == 0  # nothing held at the cap in this test
