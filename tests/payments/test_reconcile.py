"""Against a localstripe process: reconciliation credits succeeded payments that no webhook
announced, exactly once, even when the payment's row was lost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import stripe
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from billing.ledger.ledger import LedgerEntry
from billing.payments.customers import ensure_customer
from billing.payments.models import Payment
from billing.payments.reconcile import reconcile
from billing.runtime import Runtime
from tests.payments.conftest import balance, pay_on_localstripe


def test_reconciliation_credits_a_payment_no_webhook_announced_exactly_once(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    sdk: stripe.StripeClient,
    top_up: Callable[..., Payment],
) -> None:
    payment = top_up("25.00")
    intent = pay_on_localstripe(sdk, payment.payment_intent_id or "")
    assert intent.status == "succeeded"
    unpaid = top_up("10.00")  # created, never paid: not credited

    assert reconcile(db, settings=runtime.settings, now=utcnow()) == [intent.id]
    assert reconcile(db, settings=runtime.settings, now=utcnow()) == []

    assert balance(admin, payment.account_id) == "25.000000000"
    db.refresh(unpaid)
    assert unpaid.status == "pending"
    count = db.scalar(
        select(func.count())
        .select_from(LedgerEntry)
        .where(LedgerEntry.account_id == payment.account_id)
    )
    assert count == 1


def test_reconciliation_credits_a_payment_whose_row_was_lost(
    runtime: Runtime, admin: FlaskClient, db: Session, sdk: stripe.StripeClient, account: Any
) -> None:
    # The request that asked Stripe rolled back: only the PaymentIntent's metadata is left.
    customer = ensure_customer(db, account["id"], settings=runtime.settings, now=utcnow())
    intent = sdk.v1.payment_intents.create(
        params={
            "amount": 1234,
            "currency": "usd",
            "customer": customer,
            "metadata": {"account_id": account["id"], "payment_id": "pay_lost_row_1"},
        }
    )
    pay_on_localstripe(sdk, intent.id)
    assert reconcile(db, settings=runtime.settings, now=utcnow()) == [intent.id]
    assert reconcile(db, settings=runtime.settings, now=utcnow()) == []
    assert balance(admin, account["id"]) == "12.340000000"
