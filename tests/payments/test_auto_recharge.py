"""Against a localstripe process: auto-recharge charges a saved card off-session once, backs off
after a decline, and keeps to its guard rails (one pending charge, the daily cap, checked
settings)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import stripe
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from billing.notify.models import WebhookEvent
from billing.payments.auto_recharge import (
    LOST_CHARGE_AFTER,
    claim_auto_recharges,
    run_auto_recharge,
)
from billing.payments.customers import ensure_customer
from billing.payments.models import Payment
from billing.runtime import Runtime
from tests.payments.conftest import balance


@pytest.fixture
def saved_card(
    runtime: Runtime, db: Session, sdk: stripe.StripeClient, account: Any
) -> Callable[[str], str]:
    """Save a card on the account's Stripe customer; returns its payment method id."""

    def save(number: str) -> str:
        customer = ensure_customer(db, account["id"], settings=runtime.settings, now=utcnow())
        method = sdk.v1.payment_methods.create(
            params={
                "type": "card",
                "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
            }
        )
        sdk.v1.payment_methods.attach(method.id, params={"customer": customer})
        return str(method.id)

    return save


def _enable(admin: FlaskClient, account_id: str, card: str, **fields: str) -> dict[str, Any]:
    body = {
        "enabled": True,
        "threshold_usd": "5.00",
        "amount_usd": "10.00",
        "payment_method_id": card,
    } | fields
    response = admin.put(f"/admin/v1/accounts/{account_id}/auto-recharge", json=body)
    assert response.status_code == 200, response.get_json()
    result: dict[str, Any] = response.get_json()
    return result


def _run(runtime: Runtime, at: dt.datetime | None = None) -> int:
    return run_auto_recharge(
        runtime.transaction, settings=runtime.settings, clock=lambda: at or utcnow()
    )


def _auto_payments(db: Session, account_id: str) -> list[Payment]:
    db.expire_all()
    return list(
        db.scalars(
            select(Payment).where(Payment.account_id == account_id).order_by(Payment.created_at)
        )
    )


def test_auto_recharge_charges_once_off_session_with_an_idempotency_key(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    sdk: stripe.StripeClient,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    card = saved_card("4242424242424242")
    _enable(admin, account["id"], card)

    assert _run(runtime) == 1
    assert _run(runtime) == 0  # the balance is above the threshold now

    [payment] = _auto_payments(db, account["id"])
    assert payment.source == "auto_recharge" and payment.status == "succeeded"
    assert payment.idempotency_key == f"auto-recharge-{payment.id}"
    intent = sdk.v1.payment_intents.retrieve(payment.payment_intent_id or "")
    assert intent.status == "succeeded" and intent.payment_method == card
    assert intent.metadata["payment_id"] == payment.id
    assert balance(admin, account["id"]) == "10.000000000"


def test_no_new_auto_recharge_while_one_is_pending(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    _enable(admin, account["id"], saved_card("4242424242424242"))
    now = utcnow()
    first = claim_auto_recharges(db, now=now)
    assert len(first) == 1
    assert claim_auto_recharges(db, now=now) == []
    # The database holds the rule too: a second pending charge of the account is refused.
    with pytest.raises(IntegrityError), db.begin_nested():
        db.add(
            Payment(
                id="pay_second_pending",
                account_id=account["id"],
                source="auto_recharge",
                mode="payment_intent",
                status="pending",
                amount_cents=1000,
                refunded_cents=0,
                created_at=now,
                updated_at=now,
            )
        )
        db.flush()
    # A run that died before reaching Stripe is taken up again later, under the same key.
    later = now + LOST_CHARGE_AFTER + dt.timedelta(seconds=1)
    assert claim_auto_recharges(db, now=later) == first


def test_a_declined_auto_recharge_backs_off_and_is_announced(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    assert (
        admin.post("/admin/v1/webhook-endpoints", json={"url": "https://gw.test/h"}).status_code
        == 201
    )
    _enable(admin, account["id"], saved_card("4000000000000341"))  # attaches, declines charges
    start = utcnow()

    assert _run(runtime, start) == 1
    [failed] = _auto_payments(db, account["id"])
    assert failed.status == "failed" and failed.failure_message
    settings = admin.get(f"/admin/v1/accounts/{account['id']}/auto-recharge").get_json()
    assert settings["consecutive_failures"] == 1
    retry_after = dt.datetime.fromisoformat(settings["retry_after"])
    assert retry_after == start + dt.timedelta(
        seconds=runtime.settings.auto_recharge_backoff_seconds
    )
    [announced] = db.scalars(
        select(WebhookEvent).where(WebhookEvent.type == "auto_recharge.failed")
    ).all()
    assert announced.payload["payment_id"] == failed.id
    assert announced.payload["amount_usd"] == "10.000000000"

    assert _run(runtime, start + dt.timedelta(minutes=5)) == 0  # backing off
    assert _run(runtime, retry_after + dt.timedelta(seconds=1)) == 1  # declined again
    settings = admin.get(f"/admin/v1/accounts/{account['id']}/auto-recharge").get_json()
    assert settings["consecutive_failures"] == 2
    second_wait = dt.datetime.fromisoformat(settings["retry_after"]) - retry_after
    assert second_wait > dt.timedelta(seconds=2 * runtime.settings.auto_recharge_backoff_seconds)
    assert balance(admin, account["id"]) == "0.000000000"


def test_auto_recharge_respects_the_daily_cap(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    _enable(
        admin,
        account["id"],
        saved_card("4242424242424242"),
        threshold_usd="100.00",
        daily_cap_usd="20.00",
    )
    at = utcnow().replace(hour=12)
    assert [_run(runtime, at), _run(runtime, at), _run(runtime, at)] == [1, 1, 0]
    assert balance(admin, account["id"]) == "20.000000000"
    assert _run(runtime, at + dt.timedelta(days=1)) == 1  # a new UTC day
    assert balance(admin, account["id"]) == "30.000000000"


def test_auto_recharge_settings_are_checked(
    admin: FlaskClient, account: Any, saved_card: Callable[[str], str]
) -> None:
    url = f"/admin/v1/accounts/{account['id']}/auto-recharge"
    base = {"enabled": True, "threshold_usd": "5.00", "amount_usd": "10.00"}
    cases = [
        (base, "payment_method_id"),
        (base | {"payment_method_id": "pm_nope"}, "payment_method_id"),
        (base | {"amount_usd": "10.001", "payment_method_id": "x"}, "amount_usd"),
        (base | {"amount_usd": 10}, "amount_usd"),
        (base | {"threshold_usd": "-1"}, "threshold_usd"),
        (base | {"daily_cap_usd": "5.00"}, "daily_cap_usd"),
    ]
    for body, param in cases:
        response = admin.put(url, json=body)
        assert response.status_code == 400, (body, response.get_json())
        assert response.get_json()["error"]["param"] == param, (body, response.get_json())
    # A card that is someone else's is refused.
    other = admin.post("/admin/v1/accounts", json={"name": "Other"}).get_json()["id"]
    assert admin.get(f"/admin/v1/accounts/{other}/auto-recharge").status_code == 404
    card = saved_card("4242424242424242")
    response = admin.put(
        f"/admin/v1/accounts/{other}/auto-recharge", json=base | {"payment_method_id": card}
    )
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "payment_method_id"
