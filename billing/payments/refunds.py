"""Refunds: a ``charge.refunded`` event debits what Stripe refunded (DESIGN 7.2).

Invariant: a refund debits exactly the change in the charge's cumulative ``amount_refunded``
(one entry per cumulative amount, keyed by it), so partial, full, repeated and reordered refund
events debit the refunded total once.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy.orm import Session

from billing.core.settings import Settings
from billing.ledger import ledger
from billing.ledger.ledger import EntryKind, Posting
from billing.payments.fulfilment import ACTOR, payment_of_charge, stripe_id
from billing.payments.stripe_api import cents_to_nanos

log = logging.getLogger(__name__)


def charge_refunded(
    session: Session, charge: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    """Debit the change in a charge's cumulative refunded amount (``charge.refunded``); raises
    PaymentNotCredited for a payment not credited yet."""
    payment = payment_of_charge(session, charge["id"], stripe_id(charge.get("payment_intent")))
    if payment is None:
        log.info("refund of charge %s: not a payment of ours", charge["id"])
        return
    if payment.charge_id is None:
        payment.charge_id = charge["id"]
    refunded = int(charge.get("amount_refunded") or 0)
    change = refunded - payment.refunded_cents
    if change <= 0:
        return  # a repeat, or an older cumulative amount arriving late
    ledger.post(
        session,
        Posting(
            account_id=payment.account_id,
            kind=EntryKind.REFUND,
            amount_nanos=-cents_to_nanos(change),
            reason="Stripe refund",
            actor=ACTOR,
            reference=charge["id"],
            idempotency_key=f"stripe-refund:{payment.id}:{refunded}",
        ),
        low_balance_nanos=settings.balance_low_threshold,
        now=now,
    )
    payment.refunded_cents = refunded
    payment.updated_at = now
