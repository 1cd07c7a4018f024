"""Top-ups: starting one (a PaymentIntent for the card form, or a Checkout Session), paying it
with a card token, and its limits (DESIGN 6.5).

The top-up limits and whole cents are checked here and nowhere else: the page and the admin API
show this module's errors. The account is credited when Stripe confirms the payment, through
``billing.payments.fulfilment``, never here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from billing.core.errors import InvalidRequest, NotFound
from billing.core.ids import new_id
from billing.core.money import Nanos, format_dollars, whole_cents
from billing.core.settings import Settings
from billing.payments import stripe_api
from billing.payments.customers import ensure_customer
from billing.payments.models import Payment, PaymentStatus, Source
from billing.payments.stripe_api import nanos_to_cents


class PaymentNotFound(NotFound):
    """No payment of this account has that id."""


@dataclass(frozen=True)
class TopUpStart:
    """What the page needs to take a payment: a client secret (card form) or a Checkout URL."""

    mode: str
    payment_id: str
    amount_nanos: Nanos
    publishable_key: str | None
    client_secret: str | None = None
    checkout_url: str | None = None


def top_up_limits(settings: Settings) -> tuple[Nanos, Nanos]:
    """The smallest and largest top-up, in nano-dollars."""
    return settings.topup_min, settings.topup_max


def check_top_up_amount(amount_nanos: Nanos, settings: Settings) -> int:
    """The amount in cents; raises InvalidRequest (``amount_usd``) saying what is wrong with it,
    in words the top-up page shows as they are."""
    if not whole_cents(amount_nanos):
        raise InvalidRequest("The amount must be whole cents, such as 20.50.", param="amount_usd")
    low, high = top_up_limits(settings)
    if not low <= amount_nanos <= high:
        raise InvalidRequest(
            f"The amount must be between {format_dollars(low)} and {format_dollars(high)}.",
            param="amount_usd",
        )
    return nanos_to_cents(amount_nanos)


def start_top_up(
    session: Session, *, account_id: str, amount_nanos: Nanos, settings: Settings, now: dt.datetime
) -> TopUpStart:
    """Open a top-up of ``amount_nanos`` in the configured mode (TOPUP_MODE).

    Creates the Stripe PaymentIntent (its client secret is for the page's card form) or Checkout
    Session and a pending payment; the account is credited when Stripe confirms the payment.
    Raises InvalidRequest for an amount outside the limits or not in whole cents,
    AccountNotFound, StripeUnavailable.
    """
    cents = check_top_up_amount(amount_nanos, settings)
    customer_id = ensure_customer(session, account_id, settings=settings, now=now)
    payment = Payment(
        id=new_id("pay"),
        account_id=account_id,
        source=Source.TOP_UP,
        mode=settings.topup_mode,
        status=PaymentStatus.PENDING,
        amount_cents=cents,
        refunded_cents=0,
        created_at=now,
        updated_at=now,
    )
    metadata = {"account_id": account_id, "payment_id": payment.id, "source": Source.TOP_UP}
    if settings.topup_mode == "checkout":
        base = settings.public_base_url.rstrip("/")
        checkout = stripe_api.create_checkout_session(
            settings,
            customer_id=customer_id,
            cents=cents,
            metadata=metadata,
            success_url=f"{base}/billing?payment={payment.id}",
            cancel_url=f"{base}/billing",
        )
        payment.checkout_session_id = checkout["id"]
        session.add(payment)
        session.flush()
        return TopUpStart(
            mode="checkout",
            payment_id=payment.id,
            amount_nanos=amount_nanos,
            publishable_key=settings.stripe_publishable_key,
            checkout_url=checkout.get("url"),
        )
    intent = stripe_api.create_payment_intent(
        settings, customer_id=customer_id, cents=cents, metadata=metadata
    )
    payment.payment_intent_id = intent["id"]
    session.add(payment)
    session.flush()
    return TopUpStart(
        mode="payment_intent",
        payment_id=payment.id,
        amount_nanos=amount_nanos,
        publishable_key=settings.stripe_publishable_key,
        client_secret=intent.get("client_secret"),
    )


def pay_top_up(
    session: Session,
    *,
    account_id: str,
    payment_id: str,
    token: str,
    settings: Settings,
    now: dt.datetime,
) -> dict[str, Any]:
    """Pay the account's pending card top-up with a card token from Stripe.js; returns the
    PaymentIntent (its ``status`` and ``client_secret``). The account is credited when the
    webhook (or reconciliation) confirms the payment, never here.

    Raises PaymentNotFound, InvalidRequest (the payment is not a pending card top-up),
    CardDeclined, StripeUnavailable.
    """
    payment = get_payment(session, account_id=account_id, payment_id=payment_id)
    if payment.status != PaymentStatus.PENDING or payment.payment_intent_id is None:
        raise InvalidRequest(
            f"Payment {payment_id} is not a card top-up waiting to be paid.", param="payment_id"
        )
    return stripe_api.pay_with_card_token(
        settings,
        customer_id=ensure_customer(session, account_id, settings=settings, now=now),
        payment_intent_id=payment.payment_intent_id,
        token=token,
    )


def get_payment(session: Session, *, account_id: str, payment_id: str) -> Payment:
    """A payment of the account (the page polls it); raises PaymentNotFound."""
    payment = session.get(Payment, payment_id)
    if payment is None or payment.account_id != account_id:
        raise PaymentNotFound(f"No payment with id {payment_id!r}.", param="payment_id")
    return payment
