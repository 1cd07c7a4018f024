"""Against a localstripe process: a top-up end to end through its signed webhook (to the test
client and to the service running over HTTP) and a refund made with the SDK. Reconciliation and
auto-recharge against localstripe are in ``test_reconcile`` and ``test_auto_recharge``.

localstripe sends only ``payment_intent.*`` events (no ``charge.refunded``, disputes or Checkout),
ignores ``Idempotency-Key`` and cannot filter PaymentIntent lists; what it lacks is built from
the objects it holds, or stated where a test relies on our side alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from werkzeug.serving import BaseWSGIServer, make_server

from billing.app import create_app
from billing.core.db import utcnow
from billing.payments.models import Payment
from billing.payments.reconcile import reconcile
from billing.payments.top_ups import start_top_up
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.localstripe import SECRET_KEY
from tests.payments.conftest import WEBHOOK_SECRET, Deliver, balance, event, pay_on_localstripe


class _Inbox(BaseHTTPRequestHandler):
    received: list[tuple[bytes, dict[str, str]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((body, dict(self.headers.items())))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stripe_inbox(localstripe_url: str) -> Iterator[list[tuple[bytes, dict[str, str]]]]:
    """Where localstripe sends its signed webhooks (as it would to ``/stripe/webhook``)."""
    received: list[tuple[bytes, dict[str, str]]] = []
    handler = type("Inbox", (_Inbox,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/stripe/webhook"
    response = requests.post(
        f"{localstripe_url}/_config/webhooks/tests",
        data={"url": url, "secret": WEBHOOK_SECRET},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    yield received
    server.shutdown()


def _wait_for(
    inbox: list[tuple[bytes, dict[str, str]]], event_type: str, intent_id: str
) -> tuple[bytes, dict[str, str]]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for body, headers in list(inbox):
            sent = json.loads(body)
            if sent["type"] == event_type and sent["data"]["object"]["id"] == intent_id:
                return body, headers
        time.sleep(0.1)
    pytest.fail(f"localstripe sent no {event_type} for {intent_id}")


def test_top_up_end_to_end_through_localstripes_signed_webhook(
    client: FlaskClient,
    admin: FlaskClient,
    db: Session,
    sdk: stripe.StripeClient,
    stripe_inbox: list[tuple[bytes, dict[str, str]]],
    top_up: Callable[..., Payment],
) -> None:
    payment = top_up("20.00")
    intent = pay_on_localstripe(sdk, payment.payment_intent_id or "")
    assert intent.status == "succeeded"
    body, headers = _wait_for(stripe_inbox, "payment_intent.succeeded", intent.id)

    for _ in range(2):  # Stripe delivers at least once
        response = client.post(
            "/stripe/webhook",
            data=body,
            headers={"Stripe-Signature": headers["Stripe-Signature"]},
            content_type="application/json",
        )
        assert response.status_code == 200, response.get_json()
    assert balance(admin, payment.account_id) == "20.000000000"
    db.refresh(payment)
    assert payment.status == "succeeded" and payment.charge_id is not None


def test_a_refund_made_with_the_sdk_debits_it(
    runtime: Runtime,
    deliver: Deliver,
    admin: FlaskClient,
    db: Session,
    sdk: stripe.StripeClient,
    top_up: Callable[..., Payment],
) -> None:
    payment = top_up("20.00")
    intent = pay_on_localstripe(sdk, payment.payment_intent_id or "")
    assert reconcile(db, settings=runtime.settings, now=utcnow()) == [intent.id]
    sdk.v1.refunds.create(params={"payment_intent": intent.id, "amount": 750})
    db.refresh(payment)
    assert payment.charge_id is not None
    charge = sdk.v1.charges.retrieve(payment.charge_id)
    assert charge.amount_refunded == 750
    # localstripe sends no charge.refunded: build it from the charge it holds.
    refunded = event(
        "charge.refunded",
        charge_id=charge.id,
        payment_intent_id=intent.id,
        amount=charge.amount,
        amount_refunded=charge.amount_refunded,
        refunded=charge.refunded,
        customer_id=charge.customer,
    )
    assert deliver(refunded).status_code == 200
    assert balance(admin, payment.account_id) == "12.500000000"


@pytest.fixture
def served(
    committed: Engine, localstripe_url: str, tmp_path: Path
) -> Iterator[tuple[str, Runtime]]:
    """The service served over HTTP, committing for real, registered as localstripe's webhook
    endpoint; its base URL and runtime."""
    live = create_app(
        make_settings(
            tmp_path,
            stripe_api_base=localstripe_url,
            stripe_secret_key=SECRET_KEY,
            stripe_webhook_secret=WEBHOOK_SECRET,
        )
    )
    server: BaseWSGIServer = make_server("127.0.0.1", 0, live, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    hook = f"{localstripe_url}/_config/webhooks/payments-live"
    registered = requests.post(
        hook, data={"url": f"{base}/stripe/webhook", "secret": WEBHOOK_SECRET}, timeout=5
    )
    assert registered.status_code == 200, registered.text
    yield base, live.extensions["billing"]
    # localstripe cannot forget an endpoint: narrow it to an event type that never happens.
    requests.post(
        hook,
        data={"url": f"{base}/stripe/webhook", "secret": WEBHOOK_SECRET, "events[0]": "none"},
        timeout=5,
    )
    server.shutdown()
    thread.join(timeout=10)


def test_localstripe_delivers_its_signed_webhook_to_the_running_service(
    served: tuple[str, Runtime], sdk: stripe.StripeClient
) -> None:
    base, live = served
    admin = requests.Session()
    admin.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    account = admin.post(f"{base}/admin/v1/accounts", json={"name": "Live"}).json()
    key = admin.post(f"{base}/admin/v1/accounts/{account['id']}/keys", json={"name": "k"}).json()
    assert key["state"] == "insufficient_balance"
    with live.transaction() as session:
        started = start_top_up(
            session,
            account_id=account["id"],
            amount_nanos=20_000_000_000,
            settings=live.settings,
            now=utcnow(),
        )
        row = session.get(Payment, started.payment_id)
        assert row is not None
        intent_id = row.payment_intent_id
    assert pay_on_localstripe(sdk, intent_id or "").status == "succeeded"

    deadline = time.monotonic() + 15
    while admin.get(f"{base}/admin/v1/accounts/{account['id']}").json()["balance_usd"] == (
        "0.000000000"
    ):
        assert time.monotonic() < deadline, "localstripe's webhook never credited the account"
        time.sleep(0.2)
    assert admin.get(f"{base}/admin/v1/accounts/{account['id']}").json()["balance_usd"] == (
        "20.000000000"
    )
    assert admin.get(f"{base}/admin/v1/keys/{key['id']}").json()["state"] == "active"
    with live.transaction() as session:
        payment = session.get(Payment, started.payment_id)
        assert payment is not None and payment.status == "succeeded"
