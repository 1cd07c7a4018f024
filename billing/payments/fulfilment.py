"""Crediting a confirmed Stripe payment exactly once, and failing a declined one (DESIGN 6.5, 7.2).

Invariants, each held here and by the database:
- A Stripe payment is credited exactly once, whatever the order and repetition of the events
  that announce it (``payment_intent.succeeded``, the checkout events, reconciliation, the
  auto-recharge run): every path locks the payment's row and credits through
  :func:`billing.ledger.ledger.post` with the idempotency key ``stripe-payment:<payment id>``, which
  a unique index holds; the payment records its one credit (``credit_entry_id``, unique), and a
  PaymentIntent or Checkout Session id belongs to one payment (unique).
- A refund or dispute applies only to a payment already credited (:func:`payment_of_charge`);
  before that, the event is refused so that Stripe retries it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts.accounts import Account
from billing.core.errors import Conflict
from billing.core.ids import new_id
from billing.core.money import format_usd
from billing.core.settings import Settings
from billing.ledger import ledger
from billing.ledger.ledger import EntryKind, Posting
from billing.notify import outbox
from billing.payments import stripe_api
from billing.payments.models import AutoRecharge, Payment, PaymentStatus, Source
from billing.payments.stripe_api import cents_to_nanos

log = logging.getLogger(__name__)

ACTOR = "stripe"
# Back-off after consecutive declines doubles up to this.
MAX_BACKOFF = dt.timedelta(hours=24)


class PaymentNotCredited(Conflict):
    """A refund or dispute names a payment not credited yet; Stripe retries it later."""

    code = "payment_not_credited"


def stripe_id(value: Any) -> str | None:
    """An id field that the current API sends as a string and older ones (and localstripe)
    expand into an object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


def locked_payment(session: Session, *conditions: Any) -> Payment | None:
    """The payment matching ``conditions``, locked for update and read afresh (None: none)."""
    return session.scalars(
        select(Payment)
        .where(*conditions)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def _payment_for(
    session: Session,
    *,
    intent_id: str | None,
    checkout_id: str | None,
    metadata: dict[str, Any],
    cents: int,
    mode: str,
    now: dt.datetime,
) -> Payment | None:
    """The payment these Stripe ids or metadata name, locked; one is recorded for a payment of
    ours (metadata names an account) that we have no row for. None: not ours."""
    payment = None
    if intent_id is not None:
        payment = locked_payment(session, Payment.payment_intent_id == intent_id)
    if payment is None and checkout_id is not None:
        payment = locked_payment(session, Payment.checkout_session_id == checkout_id)
    payment_id = metadata.get("payment_id")
    if payment is None and isinstance(payment_id, str):
        payment = locked_payment(session, Payment.id == payment_id)
    if payment is not None:
        if intent_id is not None and payment.payment_intent_id is None:
            payment.payment_intent_id = intent_id
        if checkout_id is not None and payment.checkout_session_id is None:
            payment.checkout_session_id = checkout_id
        return payment
    account_id = metadata.get("account_id")
    if not isinstance(account_id, str) or session.get(Account, account_id) is None or cents <= 0:
        return None
    # Ours, but its row was lost (the request that made it rolled back after asking Stripe).
    # The unique Stripe ids make a concurrent second insert fail, and the event is retried.
    payment = Payment(
        id=payment_id if isinstance(payment_id, str) else new_id("pay"),
        account_id=account_id,
        source=metadata.get("source")
        if metadata.get("source") == Source.AUTO_RECHARGE
        else Source.TOP_UP,
        mode=mode,
        status=PaymentStatus.PENDING,
        amount_cents=cents,
        refunded_cents=0,
        payment_intent_id=intent_id,
        checkout_session_id=checkout_id,
        created_at=now,
        updated_at=now,
    )
    session.add(payment)
    session.flush()
    return payment


def credit(
    session: Session,
    payment: Payment,
    *,
    cents: int,
    charge_id: str | None,
    settings: Settings,
    now: dt.datetime,
) -> bool:
    """Credit the (locked) payment's account with ``cents`` unless already credited; returns
    whether this call credited it."""
    if charge_id is not None and payment.charge_id is None:
        payment.charge_id = charge_id
    if payment.credit_entry_id is not None:
        return False
    reason = "auto-recharge" if payment.source == Source.AUTO_RECHARGE else "Stripe top-up"
    entry, _ = ledger.post(
        session,
        Posting(
            account_id=payment.account_id,
            kind=EntryKind.TOP_UP,
            amount_nanos=cents_to_nanos(cents),
            reason=reason,
            actor=ACTOR,
            reference=payment.payment_intent_id or payment.checkout_session_id or payment.id,
            idempotency_key=f"stripe-payment:{payment.id}",
        ),
        low_balance_nanos=settings.balance_low_threshold,
        now=now,
    )
    payment.amount_cents = cents
    payment.status = PaymentStatus.SUCCEEDED
    payment.credit_entry_id = entry.id
    payment.failure_message = None
    payment.updated_at = now
    session.flush()
    if payment.source == Source.AUTO_RECHARGE:
        config = session.get(AutoRecharge, payment.account_id)
        if config is not None:
            config.consecutive_failures = 0
            config.retry_after = None
    balance = session.scalar(select(Account.balance_nanos).where(Account.id == payment.account_id))
    outbox.announce_top_up(
        session,
        account_id=payment.account_id,
        payment_id=payment.id,
        source=payment.source,
        amount=entry.amount_nanos,
        balance=balance or 0,
        ledger_entry_id=entry.id,
        now=now,
    )
    log.info("payment %s credited %s USD", payment.id, format_usd(entry.amount_nanos))
    return True


def fail(
    session: Session, payment: Payment, *, message: str, settings: Settings, now: dt.datetime
) -> None:
    """Mark a pending payment failed; an auto-recharge backs off and is announced. A payment
    already credited or failed is left alone (the first failure report counts once)."""
    if payment.status != PaymentStatus.PENDING:
        return
    payment.status = PaymentStatus.FAILED
    payment.failure_message = message[:500]
    payment.updated_at = now
    if payment.source != Source.AUTO_RECHARGE:
        return
    config = session.get(AutoRecharge, payment.account_id)
    failures = 1
    retry_after = now + dt.timedelta(seconds=settings.auto_recharge_backoff_seconds)
    if config is not None:
        config.consecutive_failures += 1
        failures = config.consecutive_failures
        backoff = dt.timedelta(seconds=settings.auto_recharge_backoff_seconds) * 2 ** (failures - 1)
        retry_after = now + min(backoff, MAX_BACKOFF)
        config.retry_after = retry_after
        config.last_failure = message[:500]
    log.warning(
        "auto-recharge %s of account %s declined (%d in a row): %s; next try after %s",
        payment.id,
        payment.account_id,
        failures,
        message,
        retry_after.isoformat(),
    )
    outbox.announce_auto_recharge_failed(
        session,
        account_id=payment.account_id,
        payment_id=payment.id,
        amount=payment.amount_nanos,
        reason=message,
        retry_after=retry_after,
        now=now,
    )


def fulfil_intent(
    session: Session, intent: dict[str, Any], *, settings: Settings, now: dt.datetime
) -> bool:
    """Credit a succeeded PaymentIntent of ours once; returns whether this call credited it."""
    if intent.get("currency") != stripe_api.CURRENCY:
        log.error(
            "PaymentIntent %s is in %r, not USD: not credited",
            intent.get("id"),
            intent.get("currency"),
        )
        return False
    cents = int(intent.get("amount_received") or intent.get("amount") or 0)
    payment = _payment_for(
        session,
        intent_id=intent["id"],
        checkout_id=None,
        metadata=intent.get("metadata") or {},
        cents=cents,
        mode="payment_intent",
        now=now,
    )
    if payment is None:
        log.info("PaymentIntent %s is not a payment of ours: ignored", intent.get("id"))
        return False
    return credit(
        session,
        payment,
        cents=cents,
        charge_id=stripe_id(intent.get("latest_charge")),
        settings=settings,
        now=now,
    )


def fulfil_checkout(
    session: Session, checkout: dict[str, Any], *, settings: Settings, now: dt.datetime
) -> bool:
    """Credit a paid Checkout Session of ours once; returns whether this call credited it."""
    if checkout.get("currency") != stripe_api.CURRENCY:
        log.error("Checkout Session %s is not in USD: not credited", checkout.get("id"))
        return False
    cents = int(checkout.get("amount_total") or 0)
    payment = _payment_for(
        session,
        intent_id=stripe_id(checkout.get("payment_intent")),
        checkout_id=checkout["id"],
        metadata=checkout.get("metadata") or {},
        cents=cents,
        mode="checkout",
        now=now,
    )
    if payment is None:
        log.info("Checkout Session %s is not a payment of ours: ignored", checkout.get("id"))
        return False
    return credit(session, payment, cents=cents, charge_id=None, settings=settings, now=now)


def payment_of_charge(
    session: Session, charge_id: str | None, intent_id: str | None
) -> Payment | None:
    """The locked payment of a charge (by charge id, else PaymentIntent id); raises
    PaymentNotCredited if it is not credited yet (Stripe retries the event), None if not ours."""
    payment = None
    if charge_id is not None:
        payment = locked_payment(session, Payment.charge_id == charge_id)
    if payment is None and intent_id is not None:
        payment = locked_payment(session, Payment.payment_intent_id == intent_id)
    if payment is not None and payment.credit_entry_id is None:
        raise PaymentNotCredited(
            f"Payment {payment.id} is not credited yet; the event will apply once it is."
        )
    return payment
