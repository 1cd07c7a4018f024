"""Against a localstripe process: a top-up end to end through its signed webhook, a refund made
with the SDK, reconciliation, and auto-recharge (success, decline, guard rails).

localstripe sends only ``payment_intent.*`` events (no ``charge.refunded``, disputes or Checkout),
ignores ``Idempotency-Key`` and cannot filter PaymentIntent lists; what it lacks is built from
the objects it holds, or stated where a test relies on our side alone.
"""

from __future__ import annotations

import datetime as dt
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
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.serving import BaseWSGIServer, make_server

from billing.app import create_app
from billing.core.db import utcnow
from billing.ledger.ledger import LedgerEntry
from billing.notify.models import WebhookEvent
from billing.payments import payments
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
    top_up: Callable[..., payments.Payment],
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
    top_up: Callable[..., payments.Payment],
) -> None:
    payment = top_up("20.00")
    intent = pay_on_localstripe(sdk, payment.payment_intent_id or "")
    assert payments.reconcile(db, settings=runtime.settings, now=utcnow()) == [intent.id]
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


def test_reconciliation_credits_a_payment_no_webhook_announced_exactly_once(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    sdk: stripe.StripeClient,
    top_up: Callable[..., payments.Payment],
) -> None:
    payment = top_up("25.00")
    intent = pay_on_localstripe(sdk, payment.payment_intent_id or "")
    assert intent.status == "succeeded"
    unpaid = top_up("10.00")  # created, never paid: not credited

    assert payments.reconcile(db, settings=runtime.settings, now=utcnow()) == [intent.id]
    assert payments.reconcile(db, settings=runtime.settings, now=utcnow()) == []

    assert balance(admin, payment.account_id) == "25.000000000"
    db.refresh(unpaid)
    assert unpaid.status == "pending"
    count = db.scalar(
        select(func.count())
        .select_from(LedgerEntry)
        .where(LedgerEntry.account_id == payment.account_id)
    )
    assert count == 1


def test_reconciliation_credits_a_payment_whose_row_was_lost(
    runtime: Runtime, admin: FlaskClient, db: Session, sdk: stripe.StripeClient, account: Any
) -> None:
    # The request that asked Stripe rolled back: only the PaymentIntent's metadata is left.
    customer = payments.ensure_customer(db, account["id"], settings=runtime.settings, now=utcnow())
    intent = sdk.v1.payment_intents.create(
        params={
            "amount": 1234,
            "currency": "usd",
            "customer": customer,
            "metadata": {"account_id": account["id"], "payment_id": "pay_lost_row_1"},
        }
    )
    pay_on_localstripe(sdk, intent.id)
    assert payments.reconcile(db, settings=runtime.settings, now=utcnow()) == [intent.id]
    assert payments.reconcile(db, settings=runtime.settings, now=utcnow()) == []
    assert balance(admin, account["id"]) == "12.340000000"


# Auto-recharge


@pytest.fixture
def saved_card(
    runtime: Runtime, db: Session, sdk: stripe.StripeClient, account: Any
) -> Callable[[str], str]:
    """Save a card on the account's Stripe customer; returns its payment method id."""

    def save(number: str) -> str:
        customer = payments.ensure_customer(
            db, account["id"], settings=runtime.settings, now=utcnow()
        )
        method = sdk.v1.payment_methods.create(
            params={
                "type": "card",
                "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
            }
        )
        sdk.v1.payment_methods.attach(method.id, params={"customer": customer})
        return str(method.id)

    return save


def _enable(admin: FlaskClient, account_id: str, card: str, **fields: str) -> dict[str, Any]:
    body = {
        "enabled": True,
        "threshold_usd": "5.00",
        "amount_usd": "10.00",
        "payment_method_id": card,
    } | fields
    response = admin.put(f"/admin/v1/accounts/{account_id}/auto-recharge", json=body)
    assert response.status_code == 200, response.get_json()
    result: dict[str, Any] = response.get_json()
    return result


def _run(runtime: Runtime, at: dt.datetime | None = None) -> int:
    return payments.run_auto_recharge(
        runtime.transaction, settings=runtime.settings, clock=lambda: at or utcnow()
    )


def _auto_payments(db: Session, account_id: str) -> list[payments.Payment]:
    db.expire_all()
    return list(
        db.scalars(
            select(payments.Payment)
            .where(payments.Payment.account_id == account_id)
            .order_by(payments.Payment.created_at)
        )
    )


def test_auto_recharge_charges_once_off_session_with_an_idempotency_key(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    sdk: stripe.StripeClient,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    card = saved_card("4242424242424242")
    _enable(admin, account["id"], card)

    assert _run(runtime) == 1
    assert _run(runtime) == 0  # the balance is above the threshold now

    [payment] = _auto_payments(db, account["id"])
    assert payment.source == "auto_recharge" and payment.status == "succeeded"
    assert payment.idempotency_key == f"auto-recharge-{payment.id}"
    intent = sdk.v1.payment_intents.retrieve(payment.payment_intent_id or "")
    assert intent.status == "succeeded" and intent.payment_method == card
    assert intent.metadata["payment_id"] == payment.id
    assert balance(admin, account["id"]) == "10.000000000"


def test_no_new_auto_recharge_while_one_is_pending(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    _enable(admin, account["id"], saved_card("4242424242424242"))
    now = utcnow()
    first = payments.claim_auto_recharges(db, now=now)
    assert len(first) == 1
    assert payments.claim_auto_recharges(db, now=now) == []
    # The database holds the rule too: a second pending charge of the account is refused.
    with pytest.raises(IntegrityError), db.begin_nested():
        db.add(
            payments.Payment(
                id="pay_second_pending",
                account_id=account["id"],
                source="auto_recharge",
                mode="payment_intent",
                status="pending",
                amount_cents=1000,
                refunded_cents=0,
                created_at=now,
                updated_at=now,
            )
        )
        db.flush()
    # A run that died before reaching Stripe is taken up again later, under the same key.
    later = now + payments.LOST_CHARGE_AFTER + dt.timedelta(seconds=1)
    assert payments.claim_auto_recharges(db, now=later) == first


def test_a_declined_auto_recharge_backs_off_and_is_announced(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    assert (
        admin.post("/admin/v1/webhook-endpoints", json={"url": "https://gw.test/h"}).status_code
        == 201
    )
    _enable(admin, account["id"], saved_card("4000000000000341"))  # attaches, declines charges
    start = utcnow()

    assert _run(runtime, start) == 1
    [failed] = _auto_payments(db, account["id"])
    assert failed.status == "failed" and failed.failure_message
    settings = admin.get(f"/admin/v1/accounts/{account['id']}/auto-recharge").get_json()
    assert settings["consecutive_failures"] == 1
    retry_after = dt.datetime.fromisoformat(settings["retry_after"])
    assert retry_after == start + dt.timedelta(
        seconds=runtime.settings.auto_recharge_backoff_seconds
    )
    [announced] = db.scalars(
        select(WebhookEvent).where(WebhookEvent.type == "auto_recharge.failed")
    ).all()
    assert announced.payload["payment_id"] == failed.id
    assert announced.payload["amount_usd"] == "10.000000000"

    assert _run(runtime, start + dt.timedelta(minutes=5)) == 0  # backing off
    assert _run(runtime, retry_after + dt.timedelta(seconds=1)) == 1  # declined again
    settings = admin.get(f"/admin/v1/accounts/{account['id']}/auto-recharge").get_json()
    assert settings["consecutive_failures"] == 2
    second_wait = dt.datetime.fromisoformat(settings["retry_after"]) - retry_after
    assert second_wait > dt.timedelta(seconds=2 * runtime.settings.auto_recharge_backoff_seconds)
    assert balance(admin, account["id"]) == "0.000000000"


def test_auto_recharge_respects_the_daily_cap(
    runtime: Runtime,
    admin: FlaskClient,
    db: Session,
    account: Any,
    saved_card: Callable[[str], str],
) -> None:
    _enable(
        admin,
        account["id"],
        saved_card("4242424242424242"),
        threshold_usd="100.00",
        daily_cap_usd="20.00",
    )
    at = utcnow().replace(hour=12)
    assert [_run(runtime, at), _run(runtime, at), _run(runtime, at)] == [1, 1, 0]
    assert balance(admin, account["id"]) == "20.000000000"
    assert _run(runtime, at + dt.timedelta(days=1)) == 1  # a new UTC day
    assert balance(admin, account["id"]) == "30.000000000"


def test_auto_recharge_settings_are_checked(
    admin: FlaskClient, account: Any, saved_card: Callable[[str], str]
) -> None:
    url = f"/admin/v1/accounts/{account['id']}/auto-recharge"
    base = {"enabled": True, "threshold_usd": "5.00", "amount_usd": "10.00"}
    cases = [
        (base, "payment_method_id"),
        (base | {"payment_method_id": "pm_nope"}, "payment_method_id"),
        (base | {"amount_usd": "10.001", "payment_method_id": "x"}, "amount_usd"),
        (base | {"amount_usd": 10}, "amount_usd"),
        (base | {"threshold_usd": "-1"}, "threshold_usd"),
        (base | {"daily_cap_usd": "5.00"}, "daily_cap_usd"),
    ]
    for body, param in cases:
        response = admin.put(url, json=body)
        assert response.status_code == 400, (body, response.get_json())
        assert response.get_json()["error"]["param"] == param, (body, response.get_json())
    # A card that is someone else's is refused.
    other = admin.post("/admin/v1/accounts", json={"name": "Other"}).get_json()["id"]
    assert admin.get(f"/admin/v1/accounts/{other}/auto-recharge").status_code == 404
    card = saved_card("4242424242424242")
    response = admin.put(
        f"/admin/v1/accounts/{other}/auto-recharge", json=base | {"payment_method_id": card}
    )
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == "payment_method_id"


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
        started = payments.start_top_up(
            session,
            account_id=account["id"],
            amount_nanos=20_000_000_000,
            settings=live.settings,
            now=utcnow(),
        )
        row = session.get(payments.Payment, started.payment_id)
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
        payment = session.get(payments.Payment, started.payment_id)
        assert payment is not None and payment.status == "succeeded"
