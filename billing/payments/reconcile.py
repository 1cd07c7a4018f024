"""Reconciliation: credit recent succeeded Stripe payments that no webhook announced."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy.orm import Session

from billing.core.settings import Settings
from billing.payments import stripe_api
from billing.payments.fulfilment import fulfil_checkout, fulfil_intent

log = logging.getLogger(__name__)


def reconcile(session: Session, *, settings: Settings, now: dt.datetime) -> list[str]:
    """Credit recent succeeded payments of ours that no webhook credited; returns their
    payment ids. Safe to run at any time and as often as wanted (each credits once)."""
    since = (now - dt.timedelta(hours=settings.stripe_reconcile_hours)).timestamp()
    credited = []
    for intent in stripe_api.recent_payment_intents(settings):
        if intent.get("status") != "succeeded" or int(intent.get("created") or 0) < since:
            continue
        if not (intent.get("metadata") or {}).get("account_id"):
            continue
        if fulfil_intent(session, intent, settings=settings, now=now):
            credited.append(intent["id"])
    if settings.topup_mode == "checkout":
        for checkout in stripe_api.recent_checkout_sessions(settings):
            if (
                checkout.get("payment_status") != "paid"
                or int(checkout.get("created") or 0) < since
            ):
                continue
            if (checkout.get("metadata") or {}).get("account_id") and fulfil_checkout(
                session, checkout, settings=settings, now=now
            ):
                credited.append(checkout["id"])
    for stripe_id in credited:
        log.warning("reconcile: credited %s, which no webhook had fulfilled", stripe_id)
    return credited
