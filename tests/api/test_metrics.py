"""``GET /metrics`` in one process, scraped around a real flow through the app: usage ingest
and settlement, authorize, key states, webhook deliveries, Stripe events, request latency."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import stripe
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.ledger.ledger import LedgerEntry
from billing.runtime import Runtime
from tests.api.admin.support import adjust, new_account
from tests.support import assert_error, client_with, metric_samples, new_key, sample

METRICS_TOKEN = "test-metrics-token"
STRIPE_SECRET = "whsec_metrics_test"
MODEL = "doubao-seed-2-0-mini"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def metrics_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """The app's runtime with a metrics token (and a Stripe webhook secret) set."""
    original = runtime.settings
    runtime.settings = original.model_copy(
        update={
            "metrics_token": SecretStr(METRICS_TOKEN),
            "stripe_webhook_secret": SecretStr(STRIPE_SECRET),
        }
    )
    yield runtime
    runtime.settings = original


@pytest.fixture
def scraper(app: Flask, db: Session, metrics_runtime: Runtime) -> FlaskClient:
    return client_with(app, METRICS_TOKEN)


def scrape(scraper: FlaskClient) -> Samples:
    response = scraper.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain")
    return metric_samples(response.get_data(as_text=True))


def test_metrics_is_a_404_without_a_token_setting(client: FlaskClient, runtime: Runtime) -> None:
    assert runtime.settings.metrics_token is None
    assert_error(client.get("/metrics"), 404, "not_found")
    assert_error(
        client.get("/metrics", headers={"Authorization": "Bearer anything"}), 404, "not_found"
    )


def test_an_empty_token_setting_is_no_token(client: FlaskClient, metrics_runtime: Runtime) -> None:
    metrics_runtime.settings = metrics_runtime.settings.model_copy(
        update={"metrics_token": SecretStr("")}
    )
    assert_error(client.get("/metrics"), 404, "not_found")
    assert_error(client.get("/metrics", headers={"Authorization": "Bearer "}), 404, "not_found")


def test_metrics_requires_the_token(
    client: FlaskClient, scraper: FlaskClient, admin: FlaskClient
) -> None:
    assert_error(client.get("/metrics"), 401, "invalid_api_key")
    assert_error(
        client.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"
    )
    # An admin token is not a metrics token.
    assert_error(admin.get("/metrics"), 401, "invalid_api_key")
    assert "billing_settlement_lag_seconds" in scraper.get("/metrics").get_data(as_text=True)


def test_metrics_is_not_in_the_openapi_document(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "/healthz" in paths
    assert "/metrics" not in paths


def usage(request_id: str, key_id: str, **tokens: int) -> dict[str, Any]:
    return {"request_id": request_id, "key_id": key_id, "model": MODEL, **tokens}


def test_usage_counters_move_by_what_was_accepted_and_settled(
    admin: FlaskClient, gateway: FlaskClient, scraper: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin)
    adjust(admin, account_id, "10.00")
    key_id = new_key(admin, account_id)["id"]
    before = scrape(scraper)

    first = usage(str(uuid.uuid4()), key_id, input_tokens=1000, output_tokens=200)
    events = [
        first,
        usage(str(uuid.uuid4()), key_id, input_tokens=10, output_tokens=7),
        usage(str(uuid.uuid4()), key_id, input_tokens=123, output_tokens=45),
        first,  # a duplicate
        usage(str(uuid.uuid4()), key_id, input_tokens=-1, output_tokens=1),  # rejected
    ]
    response = gateway.post("/gateway/v1/usage", json={"events": events})
    assert response.status_code == 202
    assert (response.get_json()["accepted"], response.get_json()["duplicates"]) == (3, 1)
    after = scrape(scraper)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("billing_usage_events_total", outcome="accepted") == 3
    assert moved("billing_usage_events_total", outcome="duplicate") == 1
    assert moved("billing_usage_events_total", outcome="rejected") == 1
    # No Redis: settled in-process after the commit, before the answer.
    assert moved("billing_usage_settled_events_total") == 3
    charged = db.scalar(
        select(func.sum(LedgerEntry.amount_nanos)).where(
            LedgerEntry.account_id == account_id, LedgerEntry.kind == "usage"
        )
    )
    assert charged is not None and charged < 0
    assert moved("billing_usage_charged_nanodollars_total") == -charged
    assert sample(after, "billing_settlement_lag_seconds") == 0
    # The credit took the key from 402 to active.
    assert sample(after, "billing_key_state_changes_total", state="active") >= 1
    route = "/gateway/v1/usage"
    assert (
        moved(
            "billing_http_request_duration_seconds_count", method="POST", route=route, status="202"
        )
        == 1
    )


def test_authorize_decisions_and_latency_are_counted(
    admin: FlaskClient, gateway: FlaskClient, scraper: FlaskClient
) -> None:
    account_id = new_account(admin)
    adjust(admin, account_id, "10.00")
    key = new_key(admin, account_id)
    before = scrape(scraper)

    def authorize(api_key: str) -> Any:
        return gateway.post(
            "/gateway/v1/authorize",
            json={"api_key": api_key, "model": MODEL, "request_id": str(uuid.uuid4())},
        )

    assert authorize(key["key"]).status_code == 200
    assert authorize(key["key"]).status_code in (200, 429)  # the key's default rate limit
    assert_error(authorize("sk-" + "0" * 48), 401, "invalid_api_key")
    after = scrape(scraper)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    # No Redis: every authorize goes through the Flask route.
    decisions = "billing_authorize_decisions_total"
    assert moved(decisions, status="200", code="allowed", path="app") >= 1
    assert moved(decisions, status="401", code="invalid_api_key", path="app") == 1
    assert sum(after[name] - before.get(name, 0.0) for name in after if name[0] == decisions) == 3
    assert moved("billing_authorize_duration_seconds_count", path="app") == 3
    assert moved("billing_open_holds", store="postgres") >= 1
    assert moved("billing_open_holds_nanodollars", store="postgres") > 0


def test_webhook_and_stripe_outcomes_are_counted(
    admin: FlaskClient, client: FlaskClient, scraper: FlaskClient, metrics_runtime: Runtime
) -> None:
    # Nothing listens on port 9: each attempt fails and is scheduled again.
    response = admin.post("/admin/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/x"})
    assert response.status_code == 201
    account_id = new_account(admin)
    new_key(admin, account_id)  # key.state_changed, to be delivered
    before = scrape(scraper)
    assert sample(before, "billing_webhook_deliveries_pending") >= 1
    assert sample(before, "billing_webhook_oldest_undelivered_age_seconds") >= 0

    assert metrics_runtime.deliver_webhooks() >= 1
    event = {
        "id": f"evt_metrics_{time.time_ns()}",
        "object": "event",
        "type": "customer.created",
        "data": {"object": {"id": "cus_metrics", "object": "customer"}},
    }
    payload = json.dumps(event)
    signed = {
        "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(
            payload, STRIPE_SECRET
        )
    }
    for _ in range(2):
        response = client.post("/stripe/webhook", data=payload, headers=signed)
        assert response.status_code == 200, response.get_data(as_text=True)
    forged = client.post("/stripe/webhook", data=payload, headers={"Stripe-Signature": "t=1,v1=0"})
    assert forged.status_code == 400
    after = scrape(scraper)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("billing_webhook_deliveries_total", outcome="retry_scheduled") >= 1
    assert moved("billing_webhook_deliveries_total", outcome="succeeded") == 0
    stripe_events = "billing_stripe_webhook_events_total"
    assert moved(stripe_events, type="customer.created", outcome="applied") == 1
    assert moved(stripe_events, type="customer.created", outcome="duplicate") == 1
    assert moved(stripe_events, type="unverified", outcome="invalid_signature") == 1
