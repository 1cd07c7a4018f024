"""Helpers of the enforcement tests: accounts, keys and their states over the admin API."""

from __future__ import annotations

import uuid

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts.keys import KeyStateChange


def new_account(admin: FlaskClient, credit: str = "10") -> str:
    account_id: str = admin.post("/admin/v1/accounts", json={"name": "enforced"}).get_json()["id"]
    if credit != "0":
        response = admin.post(
            f"/admin/v1/accounts/{account_id}/adjustments",
            json={"amount_usd": credit, "reason": "test"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert response.status_code == 201, response.get_json()
    return account_id


def state_changes(db: Session, key_id: str) -> list[tuple[str | None, str, str]]:
    db.expire_all()
    found = db.execute(
        select(KeyStateChange.old_state, KeyStateChange.new_state, KeyStateChange.reason)
        .where(KeyStateChange.key_id == key_id)
        .order_by(KeyStateChange.id)
    )
    return [(old, new, reason) for old, new, reason in found]


def rid() -> str:
    return f"req-{uuid.uuid4()}"
