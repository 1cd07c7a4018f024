"""``POST /stripe/webhook``: Stripe's events, verified and handed to the dispatcher
(``billing.payments.stripe_events``).

The view reads the raw body, verifies its signature (``billing.payments.stripe_api``) before
anything else, and gives the event to the dispatcher. A bad signature is a 400 and changes
nothing; a repeat is a 200 (Stripe stops resending); a failure is non-2xx and rolls back, so Stripe
resends the event later.
"""

from __future__ import annotations

from typing import Any

from flask import request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel

from billing.api import schemas
from billing.core import metrics
from billing.http.context import now, session, settings
from billing.payments import stripe_api, stripe_events

stripe_webhook = APIBlueprint(
    "stripe_webhook",
    __name__,
    abp_responses={**schemas.ANY_ROUTE_ERRORS, 409: schemas.ErrorOut},
)
STRIPE = [Tag(name="Stripe")]


class StripeWebhookOut(BaseModel):
    """A Stripe event received: applied now, or a duplicate of one applied before."""

    received: bool
    id: str
    duplicate: bool


@stripe_webhook.post("/stripe/webhook", tags=STRIPE, responses={200: StripeWebhookOut})
def receive_stripe_event() -> dict[str, Any]:
    """Apply a Stripe event signed with the endpoint's secret (`Stripe-Signature`), once."""
    config = settings()
    try:
        event = stripe_api.verify_event(
            request.get_data(cache=True), request.headers.get("Stripe-Signature"), config
        )
    except stripe_api.InvalidSignature:
        metrics.STRIPE_EVENTS.labels(type="unverified", outcome="invalid_signature").inc()
        raise
    kind = str(event.get("type"))
    try:
        applied = stripe_events.handle_event(session(), event, settings=config, now=now())
    except Exception:
        metrics.STRIPE_EVENTS.labels(type=kind, outcome="error").inc()
        raise
    metrics.STRIPE_EVENTS.labels(type=kind, outcome="applied" if applied else "duplicate").inc()
    return {"received": True, "id": event["id"], "duplicate": not applied}
