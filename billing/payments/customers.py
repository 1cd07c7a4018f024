"""The Stripe customer of each account, created on first use."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.accounts.accounts import get_account
from billing.core.settings import Settings
from billing.payments import stripe_api
from billing.payments.models import StripeCustomer


def ensure_customer(
    session: Session, account_id: str, *, settings: Settings, now: dt.datetime
) -> str:
    """The account's Stripe customer id, creating the customer on first use."""
    row = session.get(StripeCustomer, account_id)
    if row is not None:
        return row.customer_id
    account = get_account(session, account_id)
    # Stripe's idempotency key (the account id) makes a concurrent first use get the same one.
    customer_id = stripe_api.create_customer(
        settings, account_id=account.id, name=account.name, email=account.email
    )
    try:
        with session.begin_nested():
            session.add(
                StripeCustomer(account_id=account.id, customer_id=customer_id, created_at=now)
            )
    except IntegrityError:
        pass  # a concurrent request stored it first
    return customer_id
