"""Security headers on every kind of answer: the APIs' JSON, their errors (401, 404, 405, 500),
the authorize fast path, the customer page, its static files and JSON endpoints, the docs UI;
and ``Allow`` on every 405."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session

from billing.api.gateway import ALLOWED
from billing.app import create_app
from billing.core.settings import Settings
from billing.http.headers import page_policy
from tests.conftest import GATEWAY_TOKEN, make_settings
from tests.enforcement.conftest import joined
from tests.enforcement.support import new_account, rid
from tests.support import new_key

API_POLICY = {"default-src": ["'none'"], "frame-ancestors": ["'none'"]}


def policy(response: Any) -> dict[str, list[str]]:
    """The response's Content-Security-Policy, by directive."""
    header = response.headers["Content-Security-Policy"]
    directives = [part.split() for part in header.split(";") if part.strip()]
    return {name: values for name, *values in directives}


def assert_common(response: Any) -> None:
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert policy(response)["frame-ancestors"] == ["'none'"]
    assert response.headers.getlist("Content-Security-Policy") == [
        response.headers["Content-Security-Policy"]
    ]


def assert_api_headers(response: Any) -> None:
    assert_common(response)
    assert policy(response) == API_POLICY
    assert response.headers["Referrer-Policy"] == "no-referrer"


def assert_page_headers(response: Any) -> None:
    assert_common(response)
    page = policy(response)
    assert page["default-src"] == ["'none'"]
    # The test app's Stripe is the real one: Stripe.js and its frames from js.stripe.com only.
    assert page["script-src"] == ["'self'", "https://js.stripe.com", "https://*.js.stripe.com"]
    assert page["frame-src"] == [
        "https://js.stripe.com",
        "https://*.js.stripe.com",
        "https://hooks.stripe.com",
    ]
    assert page["connect-src"] == ["'self'", "https://api.stripe.com"]
    assert page["style-src"] == ["'self'"]
    assert not any("unsafe" in value for values in page.values() for value in values)
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/openapi.json", 200),
        ("GET", "/admin/v1/accounts", 200),
        ("POST", "/admin/v1/accounts", 400),
        ("GET", "/nope", 404),
        ("GET", "/metrics", 404),
        ("GET", "/billingfoo", 404),
        ("DELETE", "/healthz", 405),
    ],
)
def test_the_api_answers_carry_the_api_headers(
    admin: FlaskClient, method: str, path: str, status: int
) -> None:
    response = admin.open(path, method=method, json={} if method == "POST" else None)
    assert response.status_code == status
    assert_api_headers(response)


def test_a_refused_credential_carries_them_too(client: FlaskClient) -> None:
    response = client.get("/admin/v1/accounts")
    assert response.status_code == 401
    assert_api_headers(response)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/billing", 200),
        ("GET", "/billing/", 200),
        ("GET", "/billing/static/billing.css", 200),
        ("GET", "/billing/static/top-up.js", 200),
        ("GET", "/billing/balance", 401),
        ("POST", "/billing/sign-in", 400),  # no CSRF token
        ("GET", "/billing/nope", 404),
        ("GET", "/billing/sign-in", 405),
    ],
)
def test_the_customer_page_carries_its_strict_policy(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    response = client.open(path, method=method)
    assert response.status_code == status
    assert_page_headers(response)


def test_the_docs_ui_may_run_its_inline_bootstrap_and_nothing_from_elsewhere(
    client: FlaskClient,
) -> None:
    response = client.get("/docs/swagger")
    assert response.status_code == 200
    assert_common(response)
    docs = policy(response)
    assert docs["default-src"] == ["'self'"]
    assert docs["script-src"] == ["'self'", "'unsafe-inline'"]
    assert "connect-src" not in docs  # default-src 'self': the docs fetch /openapi.json only


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/healthz", {"GET", "HEAD", "OPTIONS"}),
        ("PUT", "/admin/v1/accounts", {"GET", "HEAD", "OPTIONS", "POST"}),
        ("GET", "/gateway/v1/authorize", {"OPTIONS", "POST"}),
        ("GET", "/gateway/v1/usage", {"OPTIONS", "POST"}),
        ("POST", "/v1/models", {"GET", "HEAD", "OPTIONS"}),
        ("GET", "/billing/sign-in", {"OPTIONS", "POST"}),
        ("GET", "/stripe/webhook", {"OPTIONS", "POST"}),
    ],
)
def test_every_405_says_which_methods_are_allowed(
    admin: FlaskClient, method: str, path: str, allowed: set[str]
) -> None:
    response = admin.open(path, method=method)
    assert response.status_code == 405
    assert {part.strip() for part in response.headers["Allow"].split(",")} == allowed
    assert response.get_json()["error"]["code"] == "method_not_allowed"


def test_a_server_error_carries_the_headers(migrated_database: str, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path))

    def boom() -> str:
        raise RuntimeError("a bug")

    app.add_url_rule("/boom", view_func=boom)

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert_api_headers(response)


def test_the_authorize_fast_path_carries_the_headers(
    app: Flask, redis_settings: Settings, db: Session
) -> None:
    redis_app = create_app(redis_settings)

    def fast_answers() -> float:
        labels = {"status": "200", "code": ALLOWED, "path": "fast"}
        return REGISTRY.get_sample_value("billing_authorize_decisions_total", labels) or 0.0

    with joined(redis_app, db, "redis") as edge:
        key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit="1000 per second")
        body = {"api_key": key["key"], "model": "doubao-seed-2-0-lite", "max_output_tokens": 10}
        gateway = redis_app.test_client()
        headers = {"Authorization": f"Bearer {GATEWAY_TOKEN}"}
        first = gateway.post(
            "/gateway/v1/authorize", json={**body, "request_id": rid()}, headers=headers
        )
        assert first.status_code == 200  # through Flask: the token is now remembered
        before = fast_answers()

        fast = gateway.post(
            "/gateway/v1/authorize", json={**body, "request_id": rid()}, headers=headers
        )

    assert fast.status_code == 200
    assert fast_answers() == before + 1  # answered in front of Flask
    assert_api_headers(fast)


@pytest.mark.parametrize(
    ("overrides", "script", "frames", "connect", "forms"),
    [
        (
            {},
            "https://js.stripe.com https://*.js.stripe.com",
            "https://js.stripe.com https://*.js.stripe.com https://hooks.stripe.com",
            "https://api.stripe.com",
            "'self'",
        ),
        (
            {
                "stripe_js_url": "http://127.0.0.1:8420/js.stripe.com/v3/",
                "stripe_api_base": "http://127.0.0.1:8420",
            },
            "http://127.0.0.1:8420",
            "http://127.0.0.1:8420",
            "http://127.0.0.1:8420",
            "'self'",
        ),
        (
            {"topup_mode": "checkout"},
            "https://js.stripe.com https://*.js.stripe.com",
            "https://js.stripe.com https://*.js.stripe.com https://hooks.stripe.com",
            "https://api.stripe.com",
            "'self' https://checkout.stripe.com",
        ),
    ],
)
def test_the_page_policy_follows_the_stripe_settings(
    tmp_path: Path,
    overrides: dict[str, str],
    script: str,
    frames: str,
    connect: str,
    forms: str,
) -> None:
    directives = dict(
        part.strip().split(" ", 1)
        for part in page_policy(make_settings(tmp_path, **overrides)).split(";")
    )
    assert directives["script-src"] == f"'self' {script}"
    assert directives["frame-src"] == frames
    assert directives["connect-src"] == f"'self' {connect}"
    assert directives["form-action"] == forms
