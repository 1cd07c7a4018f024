"""Helpers of the enforcement tests: accounts, keys and their states over the admin API, and
authorize and usage over the gateway API."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts.keys import KeyStateChange
from tests.enforcement.conftest import Edge

# Seed prices (billing/data/prices.json, from the reseller's price list), USD per million tokens.
LITE = "doubao-seed-2-0-lite"
LITE_INPUT, LITE_OUTPUT = Decimal("0.39"), Decimal("1.99")
LITE_MAX_OUTPUT = 32768
MILLION = Decimal(1_000_000)
UNLIMITED = "1000 per second"


def worst_case(input_tokens: int, output_tokens: int) -> Decimal:
    """The hold of a lite request, in USD (exact: these prices hold whole nano-dollars)."""
    return (input_tokens * LITE_INPUT + output_tokens * LITE_OUTPUT) / MILLION


def authorize(edge: Edge, key: str, **fields: Any) -> Any:
    body = {"api_key": key, "model": LITE, "request_id": rid(), **fields}
    return edge.gateway.post("/gateway/v1/authorize", json=body)


def account_amounts(edge: Edge, account_id: str) -> tuple[Decimal, Decimal, Decimal]:
    """Balance, held and available, as the admin API shows them."""
    body = edge.admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    return (
        Decimal(body["balance_usd"]),
        Decimal(body["held_usd"]),
        Decimal(body["available_usd"]),
    )


def report(edge: Edge, key: str, request_id: str, **counts: Any) -> None:
    """Report a lite request's usage and settle it."""
    response = edge.gateway.post(
        "/gateway/v1/usage",
        json={"request_id": request_id, "api_key": key, "model": LITE, **counts},
    )
    assert response.status_code == 202, response.get_json()
    edge.runtime.settle_pending()


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


def suspend(edge: Edge, key: str) -> None:
    """Report enough violations to suspend the key (the default threshold, 3)."""
    for _ in range(3):
        response = edge.gateway.post(
            "/gateway/v1/violations",
            json={"request_id": rid(), "api_key": key, "category": "violence"},
        )
        assert response.status_code == 202
