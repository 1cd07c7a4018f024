"""The Stripe event dispatcher: the ``/stripe/webhook`` view hands it a verified event, and it
applies the event once through the handler for its type (DESIGN 7.2).

Invariant: a Stripe event is applied at most once: its id is stored (primary key) in the
transaction that applies it, so a repeat is answered as a duplicate; an event whose processing
fails rolls back, id included, so Stripe's retry applies it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.core.settings import Settings
from billing.payments import stripe_objects as shapes
from billing.payments.disputes import dispute_closed, dispute_created
from billing.payments.fulfilment import fail, fulfil_checkout, fulfil_intent, locked_payment
from billing.payments.models import Payment, PaymentStatus, Source, StripeEvent
from billing.payments.refunds import charge_refunded


def _payment_intent_succeeded(
    session: Session, intent: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    fulfil_intent(session, intent, settings=settings, now=now)


def _payment_intent_failed(
    session: Session, intent: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    payment = locked_payment(session, Payment.payment_intent_id == intent["id"])
    payment_id = (intent.get("metadata") or {}).get("payment_id")
    if payment is None and isinstance(payment_id, str):
        payment = locked_payment(session, Payment.id == payment_id)
    if payment is None:
        return
    error = intent.get("last_payment_error") or {}
    message = error.get("message") or error.get("code") or "payment failed"
    if payment.source == Source.TOP_UP:
        # The customer may try another card on the same PaymentIntent: only a record, not final.
        if payment.status == PaymentStatus.PENDING:
            payment.failure_message = str(message)[:500]
            payment.updated_at = now
        return
    fail(session, payment, message=str(message), settings=settings, now=now)


def _checkout_completed(
    session: Session, checkout: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    if checkout.get("payment_status") == "paid":
        fulfil_checkout(session, checkout, settings=settings, now=now)
    # Otherwise an asynchronous method (a bank debit) is still settling: the async events follow.


def _checkout_async_succeeded(
    session: Session, checkout: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    fulfil_checkout(session, checkout, settings=settings, now=now)


def _checkout_async_failed(
    session: Session, checkout: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    payment = locked_payment(session, Payment.checkout_session_id == checkout["id"])
    if payment is not None:
        fail(session, payment, message="the payment did not complete", settings=settings, now=now)


_Handler = Callable[[Session, dict[str, Any], Settings, dt.datetime], None]
# Each handled type: its handler, and the shape of the object it reads.
HANDLERS: dict[str, tuple[_Handler, type[BaseModel]]] = {
    "payment_intent.succeeded": (_payment_intent_succeeded, shapes.PaymentIntent),
    "payment_intent.payment_failed": (_payment_intent_failed, shapes.PaymentIntent),
    "checkout.session.completed": (_checkout_completed, shapes.CheckoutSession),
    "checkout.session.async_payment_succeeded": (_checkout_async_succeeded, shapes.CheckoutSession),
    "checkout.session.async_payment_failed": (_checkout_async_failed, shapes.CheckoutSession),
    "charge.refunded": (charge_refunded, shapes.Charge),
    "charge.dispute.created": (dispute_created, shapes.Dispute),
    "charge.dispute.closed": (dispute_closed, shapes.Dispute),
}


def handle_event(
    session: Session, event: dict[str, Any], *, settings: Settings, now: dt.datetime
) -> bool:
    """Apply a verified Stripe event once; returns False for a repeat of one already applied.

    Event types we do not handle are recorded and ignored. Raises InvalidRequest, naming the
    field, for an event (or the object its handler reads) not shaped as Stripe sends it, and
    PaymentNotCredited (and any failure) for an event to be retried: the caller must roll back
    and answer non-2xx.
    """
    handler, shape = HANDLERS.get(str(event.get("type")), (None, None))
    shapes.check_event(event, shape)
    try:
        with session.begin_nested():
            session.add(StripeEvent(id=event["id"], type=event["type"], processed_at=now))
    except IntegrityError:
        return False
    if handler is not None:
        handler(session, event["data"]["object"], settings, now)
    return True
