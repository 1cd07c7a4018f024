"""The one module that talks to Stripe (the official ``stripe`` SDK).

Invariants:
- Nothing else imports ``stripe``: the rest of the service sees plain dicts (the JSON Stripe
  sent) and the errors below, so the API base, keys and webhook secret come from settings alone
  and tests and the demo run against localstripe.
- A webhook body is verified (signature and age, on the raw bytes) before it is parsed:
  :func:`verify_event` is the only way to read one.
- Money crosses this boundary in cents (Stripe's unit for USD); :func:`nanos_to_cents` and
  :func:`cents_to_nanos` convert exactly and refuse fractions of a cent.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import stripe

from billing.core.errors import BillingError, InvalidRequest
from billing.core.money import NANOS_PER_CENT, Nanos, whole_cents
from billing.core.settings import Settings

log = logging.getLogger(__name__)

CURRENCY = "usd"
# Stripe's default: a signed event older than this (seconds) is refused as a replay.
SIGNATURE_TOLERANCE = 300


class StripeUnavailable(BillingError):
    """Stripe could not be reached or refused the request; nothing was charged by us."""

    status = 502
    code = "payment_provider_error"
    type = "server_error"


class StripeNotConfigured(BillingError):
    """A Stripe setting this needs is not set."""

    status = 503
    code = "payments_not_configured"
    type = "server_error"


class InvalidSignature(InvalidRequest):
    """A Stripe webhook whose signature is missing, wrong or too old."""

    code = "invalid_signature"


def cents_to_nanos(cents: int) -> Nanos:
    """Stripe cents as nano-dollars (exact)."""
    return cents * NANOS_PER_CENT


def nanos_to_cents(nanos: Nanos, *, param: str = "amount_usd") -> int:
    """Nano-dollars as Stripe cents; raises InvalidRequest for a fraction of a cent."""
    if not whole_cents(nanos):
        raise InvalidRequest(f"{param} must be a whole number of cents.", param=param)
    return nanos // NANOS_PER_CENT


def _client(settings: Settings) -> stripe.StripeClient:
    if settings.stripe_secret_key is None:
        raise StripeNotConfigured("Payments are not configured: STRIPE_SECRET_KEY is not set.")
    return stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        base_addresses={"api": settings.stripe_api_base.rstrip("/")},
        max_network_retries=2,
    )


def _plain(obj: Any) -> dict[str, Any]:
    # The JSON Stripe sent, as plain dicts and lists, so no SDK type leaks out of this module.
    return cast(dict[str, Any], json.loads(json.dumps(obj.to_dict(for_json=True))))


def _unavailable(exc: stripe.StripeError) -> StripeUnavailable:
    log.warning("Stripe request failed: %s", exc)
    return StripeUnavailable(f"The payment provider refused or failed the request: {exc}")


def verify_event(payload: bytes, signature: str | None, settings: Settings) -> dict[str, Any]:
    """The event in a Stripe webhook body, once its signature is verified.

    Raises InvalidSignature for a missing, malformed, wrong or stale signature (or a body that
    is not an event), StripeNotConfigured when no webhook secret is set.
    """
    if settings.stripe_webhook_secret is None:
        raise StripeNotConfigured("Stripe webhooks are not configured: set STRIPE_WEBHOOK_SECRET.")
    if not signature:
        raise InvalidSignature("The Stripe-Signature header is missing.", param="Stripe-Signature")
    try:
        event = stripe.Webhook.construct_event(
            payload,
            signature,
            settings.stripe_webhook_secret.get_secret_value(),
            tolerance=SIGNATURE_TOLERANCE,
        )
    except stripe.SignatureVerificationError:
        raise InvalidSignature(
            "The Stripe-Signature header does not verify this body (wrong, tampered or stale).",
            param="Stripe-Signature",
        ) from None
    except (ValueError, UnicodeDecodeError, IndexError, AttributeError, TypeError, RecursionError):
        raise InvalidSignature(
            "The body or its Stripe-Signature header is malformed.", param="Stripe-Signature"
        ) from None
    if _signed_at(signature) > time.time() + SIGNATURE_TOLERANCE:
        # The SDK bounds only the age; a timestamp from the future is as suspect as a stale one.
        raise InvalidSignature(
            "The Stripe-Signature timestamp is in the future.", param="Stripe-Signature"
        )
    return _plain(event)


def _signed_at(signature: str) -> int:
    for part in signature.split(","):
        name, _, value = part.partition("=")
        if name.strip() == "t" and value.strip().isdigit():
            return int(value)
    return 0


def create_customer(settings: Settings, *, account_id: str, name: str, email: str | None) -> str:
    """A new Stripe customer for the account; returns its id."""
    params: dict[str, Any] = {"name": name, "metadata": {"account_id": account_id}}
    if email:
        params["email"] = email
    try:
        customer = _client(settings).v1.customers.create(
            params=cast(Any, params), options={"idempotency_key": f"customer-{account_id}"}
        )
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    return str(customer.id)


def create_payment_intent(
    settings: Settings, *, customer_id: str, cents: int, metadata: dict[str, str]
) -> dict[str, Any]:
    """A card PaymentIntent for the page's card form to confirm (it carries a client secret)."""
    try:
        intent = _client(settings).v1.payment_intents.create(
            params={
                "amount": cents,
                "currency": CURRENCY,
                "customer": customer_id,
                "metadata": metadata,
            },
            options={"idempotency_key": f"top-up-{metadata['payment_id']}"},
        )
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    return _plain(intent)


def create_checkout_session(
    settings: Settings,
    *,
    customer_id: str,
    cents: int,
    metadata: dict[str, str],
    success_url: str,
    cancel_url: str,
) -> dict[str, Any]:
    """A hosted Checkout Session for one top-up of ``cents``; the PaymentIntent it makes
    carries the same metadata."""
    try:
        checkout = _client(settings).v1.checkout.sessions.create(
            params={
                "mode": "payment",
                "customer": customer_id,
                "line_items": [
                    {
                        "quantity": 1,
                        "price_data": {
                            "currency": CURRENCY,
                            "unit_amount": cents,
                            "product_data": {"name": "Account top-up"},
                        },
                    }
                ],
                "metadata": metadata,
                "payment_intent_data": {"metadata": metadata},
                "success_url": success_url,
                "cancel_url": cancel_url,
            },
            options={"idempotency_key": f"top-up-{metadata['payment_id']}"},
        )
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    return _plain(checkout)


class CardDeclined(BillingError):
    """The card was declined (or could not be used); nothing was charged."""

    status = 402
    code = "card_declined"
    type = "card_error"


def pay_with_card_token(
    settings: Settings, *, customer_id: str, payment_intent_id: str, token: str
) -> dict[str, Any]:
    """Pay a PaymentIntent with the card Stripe.js tokenised in the customer's browser (its
    number never reaches us): the card is saved to the customer, so auto-recharge can use it,
    and the intent is confirmed. Returns the intent: ``succeeded``, or ``requires_action`` when
    the bank wants the customer to authenticate (the page hands that to Stripe.js).

    Raises CardDeclined, StripeUnavailable.
    """
    client = _client(settings)
    try:
        card = client.v1.customers.payment_sources.create(customer_id, params={"source": token})
        client.v1.payment_intents.update(payment_intent_id, params={"payment_method": card.id})
        intent = client.v1.payment_intents.confirm(payment_intent_id)
    except stripe.CardError as exc:
        raise CardDeclined(exc.user_message or "The card was declined.", param="token") from exc
    except stripe.InvalidRequestError as exc:
        raise InvalidRequest(
            f"Stripe refused the card: {exc.user_message or exc}", param="token"
        ) from exc
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    return _plain(intent)


@dataclass(frozen=True)
class OffSessionCharge:
    """How an off-session charge ended: the PaymentIntent (if one was made) and any decline."""

    intent: dict[str, Any] | None
    declined: str | None


def charge_off_session(
    settings: Settings,
    *,
    customer_id: str,
    payment_method_id: str,
    cents: int,
    metadata: dict[str, str],
    idempotency_key: str,
) -> OffSessionCharge:
    """Charge a saved card without the customer present. The same ``idempotency_key`` within a
    day returns the first attempt's PaymentIntent instead of charging again.

    A decline (or a card needing authentication) is an outcome, not an error; raises
    StripeUnavailable when Stripe cannot be reached.
    """
    try:
        intent = _client(settings).v1.payment_intents.create(
            params={
                "amount": cents,
                "currency": CURRENCY,
                "customer": customer_id,
                "payment_method": payment_method_id,
                "off_session": True,
                "confirm": True,
                "metadata": metadata,
            },
            options={"idempotency_key": idempotency_key},
        )
    except stripe.CardError as exc:
        failed = exc.error.payment_intent if exc.error is not None else None
        return OffSessionCharge(
            _plain(failed) if failed is not None else None, exc.user_message or str(exc)
        )
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    plain = _plain(intent)
    if plain.get("status") in ("requires_action", "requires_payment_method"):
        return OffSessionCharge(plain, "The card needs the customer to authenticate the charge.")
    return OffSessionCharge(plain, None)


def payment_method_customer(settings: Settings, payment_method_id: str) -> str | None:
    """The customer a payment method is attached to (None: not attached); raises
    InvalidRequest if there is no such payment method."""
    try:
        method = _client(settings).v1.payment_methods.retrieve(payment_method_id)
    except stripe.InvalidRequestError:
        raise InvalidRequest(
            f"No Stripe payment method {payment_method_id!r}.", param="payment_method_id"
        ) from None
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    customer = method.customer
    return None if customer is None else str(getattr(customer, "id", customer))


def recent_payment_intents(settings: Settings, *, limit: int = 100) -> list[dict[str, Any]]:
    """The most recent PaymentIntents, newest first (one page: reconciliation runs often)."""
    try:
        page = _client(settings).v1.payment_intents.list(params={"limit": limit})
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    return [_plain(intent) for intent in page.data]


def recent_checkout_sessions(settings: Settings, *, limit: int = 100) -> list[dict[str, Any]]:
    """The most recent completed Checkout Sessions, newest first."""
    try:
        page = _client(settings).v1.checkout.sessions.list(
            params={"limit": limit, "status": "complete"}
        )
    except stripe.StripeError as exc:
        raise _unavailable(exc) from exc
    return [_plain(checkout) for checkout in page.data]
