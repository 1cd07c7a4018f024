"""Helpers of the admin API key tests: an account to own keys, credit for it, a key as the API
shows it, a PATCH, and the key's recorded state changes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts.keys import KeyStateChange


def new_account(admin: FlaskClient) -> str:
    response = admin.post("/admin/v1/accounts", json={"name": "key owner"})
    assert response.status_code == 201
    return response.get_json()["id"]


def adjust(admin: FlaskClient, account_id: str, amount: str) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": amount, "reason": "test"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.get_json()


def get_key(admin: FlaskClient, key_id: str) -> dict[str, Any]:
    response = admin.get(f"/admin/v1/keys/{key_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def patch(admin: FlaskClient, key_id: str, **fields: Any) -> Any:
    return admin.patch(f"/admin/v1/keys/{key_id}", json=fields)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


def state_changes(db: Session, key_id: str) -> list[tuple[str | None, str, str]]:
    rows = db.execute(
        select(KeyStateChange.old_state, KeyStateChange.new_state, KeyStateChange.reason)
        .where(KeyStateChange.key_id == key_id)
        .order_by(KeyStateChange.id)
    )
    return [(old, new, reason) for old, new, reason in rows]
