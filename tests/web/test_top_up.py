"""A top-up end to end in real headless Chromium: the page, localstripe's Stripe.js stand-in, a
signed Stripe webhook, the credit on the page, and the gateway told that the key is active.

The page has Stripe.js (here localstripe's stand-in) turn the typed card into a token, and the
server pays the PaymentIntent with it; a card whose bank asks for 3-D Secure is then
authenticated through Stripe.js (the stand-in's dialog).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import requests
import stripe
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Page, expect

from billing.runtime import Runtime
from tests.localstripe import SECRET_KEY
from tests.notify.conftest import key_changes, register, start_receiver
from tests.web.conftest import ARTIFACTS, STRIPE_WEBHOOK_SECRET
from tests.web.support import customer, sign_in

CARD = "4242424242424242"
CARD_WITH_3DS = "4000002500003155"
CARD_DECLINED = "4000000000000002"


def test_a_402_customer_tops_up_20_dollars_by_card_and_sees_the_credit(
    page: Page,
    live_app: Flask,
    live_server: str,
    localstripe_url: str,
    admin_api: FlaskClient,
) -> None:
    gateway = start_receiver()
    try:
        register(admin_api, gateway, ["key.state_changed"])
        empty = customer(admin_api, credit_usd=None)
        assert empty.key["http_status"] == 402
        sign_in(page, live_server, empty.secret)
        expect(page.locator("#keys tbody tr")).to_contain_text("(402)")

        page.get_by_label("$20.00").check()
        page.get_by_role("button", name="Continue to payment").click()
        expect(page.get_by_role("heading", name="Pay $20.00")).to_be_visible()
        _type_card(page, CARD)
        page.get_by_role("button", name="Pay $20.00").click()
        expect(page.locator("#pay-status")).to_contain_text("Waiting for it to be credited")
        intent_id = _client_secret(page).split("_secret_")[0]
        intent = _wait_for_intent(localstripe_url, intent_id, "succeeded")
        assert intent["amount"] == 2000

        answer = _deliver(live_server, "payment_intent.succeeded", intent)
        assert answer.status_code == 200, answer.text

        # The page polls the payment and shows the credit once the webhook has landed.
        expect(page.locator("#payment-notice")).to_contain_text(
            "your payment of $20.00 has been credited", timeout=15_000
        )
        expect(page.locator("#balance")).to_have_text("$20.00")
        expect(page.locator("#available")).to_have_text("$20.00")
        expect(page.locator("#keys tbody tr")).to_contain_text("Active")
        expect(page.locator("#ledger tbody tr").first).to_have_attribute("data-kind", "top_up")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "top-up-credited.png", full_page=True)

        # The same event again credits nothing more.
        again = _deliver(live_server, "payment_intent.succeeded", intent)
        assert again.status_code == 200
        page.reload()
        expect(page.locator("#balance")).to_have_text("$20.00")

        # Embedded (no Redis, no worker), `billing webhooks deliver` sends the queued webhooks.
        runtime: Runtime = live_app.extensions["billing"]
        with live_app.app_context():
            assert runtime.deliver_webhooks() >= 1
        changes = gateway.wait_for(
            lambda received: [
                change
                for change in key_changes(received, empty.key["id"])
                if change["new_state"] == "active"
            ],
            "key.state_changed to active",
        )
        assert changes[0]["old_state"] == "insufficient_balance"
    finally:
        gateway.server.shutdown()
        gateway.server.server_close()


def _client_secret(page: Page) -> str:
    secret = page.locator("#pay-form").get_attribute("data-client-secret")
    assert secret and secret.startswith("pi_")
    return secret


def _type_card(page: Page, number: str) -> None:
    card = page.locator("#card-element")
    for field, value in (
        ("number", number),
        ("exp_month", "12"),
        ("exp_year", "34"),
        ("cvc", "123"),
        ("postal_code", "10001"),
    ):
        card.get_by_placeholder(field, exact=True).fill(value)


def test_a_card_that_asks_for_3d_secure_is_authenticated_through_stripe_js(
    page: Page, live_server: str, localstripe_url: str, admin_api: FlaskClient
) -> None:
    sign_in(page, live_server, customer(admin_api, credit_usd=None).secret)
    page.get_by_label("$20.00").check()
    page.get_by_role("button", name="Continue to payment").click()
    _type_card(page, CARD_WITH_3DS)
    page.get_by_role("button", name="Pay $20.00").click()
    page.get_by_role("button", name="Complete authentication").click()
    expect(page.locator("#pay-status")).to_contain_text("Waiting for it to be credited")
    intent = _wait_for_intent(
        localstripe_url, _client_secret(page).split("_secret_")[0], "succeeded"
    )
    assert intent["amount"] == 2000


def test_a_declined_card_shows_why_beside_the_card_form(
    page: Page, live_server: str, admin_api: FlaskClient
) -> None:
    sign_in(page, live_server, customer(admin_api, credit_usd=None).secret)
    page.get_by_label("$20.00").check()
    page.get_by_role("button", name="Continue to payment").click()
    _type_card(page, CARD_DECLINED)
    with page.expect_response(lambda answer: answer.url.endswith("/card")) as answer:
        page.get_by_role("button", name="Pay $20.00").click()

    assert answer.value.status == 402
    expect(page.locator("#pay-status")).to_have_text("Your card was declined.")
    expect(page.get_by_role("button", name="Pay $20.00")).to_be_enabled()


def _wait_for_intent(localstripe_url: str, intent_id: str, status: str) -> dict[str, Any]:
    """The intent as Stripe's API returns it (the JSON a webhook carries), once in ``status``."""
    deadline = time.monotonic() + 10
    while True:
        response = requests.get(
            f"{localstripe_url}/v1/payment_intents/{intent_id}",
            headers={"Authorization": f"Bearer {SECRET_KEY}"},
            timeout=5,
        )
        response.raise_for_status()
        intent: dict[str, Any] = response.json()
        if intent["status"] == status or time.monotonic() > deadline:
            assert intent["status"] == status, intent
            return intent
        time.sleep(0.1)


def _deliver(live_server: str, event_type: str, obj: dict[str, Any]) -> requests.Response:
    """Post a Stripe event about ``obj`` to /stripe/webhook, signed by the Stripe SDK."""
    payload = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": int(time.time()),
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
    )
    signature = stripe.WebhookSignature.generate_signature_header(payload, STRIPE_WEBHOOK_SECRET)
    return requests.post(
        f"{live_server}/stripe/webhook",
        data=payload.encode(),
        headers={"Content-Type": "application/json", "Stripe-Signature": signature},
        timeout=10,
    )
