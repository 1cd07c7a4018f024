"""Fixtures for Stripe payments: an app configured for a localstripe process, Stripe events
loaded from JSON fixtures (current API shapes) and signed with the SDK, and an SDK client for
driving localstripe as a customer's browser or Stripe itself would."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import stripe
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.app import create_app
from billing.core.db import utcnow
from billing.core.money import parse_usd
from billing.payments.models import Payment
from billing.payments.top_ups import start_top_up
from billing.runtime import Runtime
from tests.conftest import make_settings
from tests.localstripe import PUBLISHABLE_KEY, SECRET_KEY, localstripe_url

__all__ = ["localstripe_url"]

WEBHOOK_SECRET = "whsec_test_payments_secret"
EVENTS = Path(__file__).parent / "events"
_serial = itertools.count(1)


@pytest.fixture(scope="session")
def app(
    migrated_database: str, tmp_path_factory: pytest.TempPathFactory, localstripe_url: str
) -> Flask:
    """The app, with Stripe pointed at the session's localstripe."""
    return create_app(
        make_settings(
            tmp_path_factory.mktemp("payments-data"),
            stripe_api_base=localstripe_url,
            stripe_secret_key=SECRET_KEY,
            stripe_publishable_key=PUBLISHABLE_KEY,
            stripe_webhook_secret=WEBHOOK_SECRET,
            stripe_js_url=f"{localstripe_url}/js.stripe.com/v3/",
        )
    )


@pytest.fixture(scope="session")
def sdk(localstripe_url: str) -> stripe.StripeClient:
    """The Stripe SDK talking to localstripe, for what a browser or Stripe itself would do."""
    return stripe.StripeClient(SECRET_KEY, base_addresses={"api": localstripe_url})


def event(name: str, **values: Any) -> dict[str, Any]:
    """The Stripe event fixture ``events/<name>.json`` with its ``{{placeholders}}`` filled in
    (a fresh event id and the current time unless given)."""
    values.setdefault("event_id", f"evt_test_{time.time_ns()}_{next(_serial)}")
    values.setdefault("created", int(time.time()))

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if isinstance(node, str) and "{{" in node:
            if node.startswith("{{") and node.endswith("}}") and node.count("{{") == 1:
                return values[node[2:-2]]
            for key, value in values.items():
                node = node.replace("{{" + key + "}}", str(value))
        return node

    filled: dict[str, Any] = fill(json.loads((EVENTS / f"{name}.json").read_text()))
    return filled


def sign(payload: str, *, timestamp: int | None = None, secret: str = WEBHOOK_SECRET) -> str:
    """A ``Stripe-Signature`` header for ``payload``, made by the Stripe SDK."""
    header: str = stripe.WebhookSignature.generate_signature_header(
        payload, secret, timestamp=timestamp
    )
    return header


Deliver = Callable[..., Any]


@pytest.fixture
def deliver(client: FlaskClient) -> Deliver:
    """Post an event to ``/stripe/webhook`` signed as Stripe would; returns the response."""

    def post(body: dict[str, Any] | str, **headers: str) -> Any:
        payload = body if isinstance(body, str) else json.dumps(body, indent=2)
        headers = {"Stripe-Signature": sign(payload)} | headers
        return client.post(
            "/stripe/webhook",
            data=payload.encode(),
            headers={key: value for key, value in headers.items() if value},
            content_type="application/json",
        )

    return post


@pytest.fixture
def account(admin: FlaskClient) -> dict[str, Any]:
    """A new, empty account."""
    response = admin.post("/admin/v1/accounts", json={"name": "Payer", "email": "pay@acme.test"})
    assert response.status_code == 201
    body: dict[str, Any] = response.get_json()
    return body


@pytest.fixture
def top_up(db: Session, runtime: Runtime, account: dict[str, Any]) -> Callable[..., Any]:
    """Start a top-up of the account on localstripe; returns its pending payment row."""

    def start(amount_usd: str = "20.00") -> Payment:
        started = start_top_up(
            db,
            account_id=account["id"],
            amount_nanos=parse_usd(amount_usd),
            settings=runtime.settings,
            now=utcnow(),
        )
        assert started.mode == "payment_intent" and started.client_secret
        payment = db.get(Payment, started.payment_id)
        assert payment is not None and payment.payment_intent_id
        return payment

    return start


def succeeded(payment: Payment, **values: Any) -> dict[str, Any]:
    """``payment_intent.succeeded`` for a pending payment of ours."""
    fields: dict[str, Any] = {
        "payment_intent_id": payment.payment_intent_id,
        "amount": payment.amount_cents,
        "customer_id": "cus_TESTONLY",
        "charge_id": f"ch_{payment.id}",
        "account_id": payment.account_id,
        "payment_id": payment.id,
    }
    return event("payment_intent.succeeded", **(fields | values))


def balance(admin: FlaskClient, account_id: str) -> str:
    """The account's balance as the admin API shows it."""
    body = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    value: str = body["balance_usd"]
    return value


def pay_on_localstripe(
    sdk: stripe.StripeClient, intent_id: str, card: str = "4242424242424242"
) -> Any:
    """Give the PaymentIntent a card and confirm it, as Stripe.js would; returns the intent."""
    method = sdk.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": card, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    sdk.v1.payment_intents.update(intent_id, params={"payment_method": method.id})
    return sdk.v1.payment_intents.confirm(intent_id)
