"""Failed admin, gateway and API-key authentications are limited per client address: past the
limit, that address is answered 429 before its credential is looked at (issue 10, item 7)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session

from billing.app import create_app
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN, TEST_REDIS_URL, make_settings
from tests.enforcement.conftest import joined
from tests.enforcement.support import new_account
from tests.support import assert_error, new_key

LIMIT = 3
WRONG = "Bearer not-a-token-of-ours-0123456789abcdef"


@pytest.fixture(scope="module")
def limited_app(app: Flask, tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """An app of its own allowing LIMIT failures per minute (``app`` loaded the price table)."""
    return create_app(
        make_settings(
            tmp_path_factory.mktemp("limited"), auth_failure_rate_limit=f"{LIMIT} per minute"
        )
    )


@pytest.fixture(scope="module")
def limited_redis_apps(app: Flask, tmp_path_factory: pytest.TempPathFactory) -> list[Flask]:
    """Two apps (two API processes, as it were) sharing the Redis windows."""
    return [
        create_app(
            make_settings(
                tmp_path_factory.mktemp("limited-redis"),
                redis_url=TEST_REDIS_URL,
                auth_failure_rate_limit=f"{LIMIT} per minute",
            )
        )
        for _ in range(2)
    ]


@pytest.fixture
def limited(limited_app: Flask, db: Session) -> Iterator[Flask]:
    with joined(limited_app, db, "postgres"):
        yield limited_app


def address() -> str:
    """A client address no other test (or earlier run) has used."""
    return f"2001:db8::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"


def call(
    client: FlaskClient, method: str, path: str, authorization: str, source: str, **kwargs: Any
) -> Any:
    return client.open(
        path,
        method=method,
        headers={"Authorization": authorization},
        environ_base={"REMOTE_ADDR": source},
        **kwargs,
    )


def assert_locked_out(response: Any) -> None:
    """A 429 rate_limit_exceeded naming the credential, with a Retry-After within the window."""
    error = assert_error(response, 429, "rate_limit_exceeded", "Authorization")
    assert "failed authentications" in error["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60


ROUTES = {
    "admin": ("GET", "/admin/v1/accounts", f"Bearer {ADMIN_TOKEN}"),
    "gateway": ("GET", "/gateway/v1/key-states", f"Bearer {GATEWAY_TOKEN}"),
}


@pytest.mark.parametrize("kind", ["admin", "gateway"])
def test_past_the_limit_even_the_right_token_is_answered_429_unchecked(
    limited: Flask, kind: str
) -> None:
    client, source = limited.test_client(), address()
    method, path, right = ROUTES[kind]
    assert call(client, method, path, right, source).status_code == 200
    for _ in range(LIMIT):
        assert_error(call(client, method, path, WRONG, source), 401, "invalid_api_key")
    assert_locked_out(call(client, method, path, right, source))
    assert_locked_out(call(client, method, path, WRONG, source))
    assert_locked_out(call(client, method, path, "", source))  # no credential at all

    # Another address is not affected, nor is the other kind of credential at this address.
    assert call(client, method, path, right, address()).status_code == 200
    other = "gateway" if kind == "admin" else "admin"
    other_method, other_path, other_right = ROUTES[other]
    assert call(client, other_method, other_path, other_right, source).status_code == 200


def test_successful_authentications_are_not_counted(limited: Flask) -> None:
    client, source = limited.test_client(), address()
    method, path, right = ROUTES["admin"]
    for _ in range(3 * LIMIT):
        assert call(client, method, path, right, source).status_code == 200
    for _ in range(LIMIT - 1):
        assert_error(call(client, method, path, WRONG, source), 401, "invalid_api_key")
    assert call(client, method, path, right, source).status_code == 200
    assert_error(call(client, method, path, WRONG, source), 401, "invalid_api_key")
    assert_locked_out(call(client, method, path, right, source))


def test_a_missing_credential_counts_as_a_failure(limited: Flask) -> None:
    client, source = limited.test_client(), address()
    method, path, right = ROUTES["admin"]
    for _ in range(LIMIT):
        assert_error(call(client, method, path, "", source), 401, "invalid_api_key")
    assert_locked_out(call(client, method, path, right, source))


def test_customer_keys_are_limited_per_address_too(limited: Flask) -> None:
    admin = limited.test_client()
    admin.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    key = new_key(admin, new_account(admin, "0"))["key"]
    client, source = limited.test_client(), address()
    right = f"Bearer {key}"
    assert call(client, "GET", "/v1/models", right, source).status_code == 200
    for _ in range(LIMIT):
        wrong = f"Bearer sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
        assert_error(call(client, "GET", "/v1/models", wrong, source), 401, "invalid_api_key")
    assert_locked_out(call(client, "GET", "/v1/dashboard/billing/subscription", right, source))
    assert call(client, "GET", "/v1/models", right, address()).status_code == 200
    # The customer's failures did not lock the operator out of the same address.
    assert call(client, *ROUTES["admin"], source).status_code == 200


def test_a_customer_key_refused_at_authorize_is_not_the_gateways_failure(limited: Flask) -> None:
    """The gateway relays customers' keys: a key authorize refuses is not a failed
    authentication of the gateway."""
    client, source = limited.test_client(), address()
    for _ in range(LIMIT + 2):
        refused = call(
            client,
            "POST",
            "/gateway/v1/authorize",
            f"Bearer {GATEWAY_TOKEN}",
            source,
            json={"api_key": "sk-" + "x" * 48, "model": "doubao-seed-2-0-lite", "request_id": "r"},
        )
        assert_error(refused, 401, "invalid_api_key")
    assert call(client, *ROUTES["gateway"], source).status_code == 200


def authorize_decisions(path: str, status: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "billing_authorize_decisions_total", {"path": path, "status": status, "code": code}
    )
    return value or 0.0


def test_the_windows_are_shared_through_redis_and_hold_on_the_fast_path(
    limited_redis_apps: list[Flask], db: Session
) -> None:
    first, second = limited_redis_apps
    source = address()
    with joined(first, db, "redis") as edge, joined(second, db, "redis"):
        key = new_key(edge.admin, new_account(edge.admin, "10"), rate_limit="1000 per second")

        def authorize(flask_app: Flask, authorization: str) -> Any:
            return call(
                flask_app.test_client(),
                "POST",
                "/gateway/v1/authorize",
                authorization,
                source,
                json={
                    "api_key": key["key"],
                    "model": "doubao-seed-2-0-lite",
                    "request_id": str(uuid.uuid4()),
                    "max_output_tokens": 10,
                },
            )

        right = f"Bearer {GATEWAY_TOKEN}"
        # The first authorize goes through the route (the token is new to the process); the next
        # one is answered by the fast path, in front of Flask.
        assert authorize(first, right).status_code == 200
        fast = authorize_decisions("fast", "200", "allowed")
        assert authorize(first, right).status_code == 200
        assert authorize_decisions("fast", "200", "allowed") == fast + 1

        # Failures counted by the other process lock this address out of both.
        for _ in range(LIMIT):
            assert_error(authorize(second, WRONG), 401, "invalid_api_key")
        assert_locked_out(authorize(second, right))
        time.sleep(1.1)  # what the first process last read of the window is now stale
        assert_locked_out(authorize(first, right))
        assert authorize_decisions("fast", "200", "allowed") == fast + 1

        # Another address still gets through, on the fast path.
        other = call(
            first.test_client(),
            "POST",
            "/gateway/v1/authorize",
            right,
            address(),
            json={"api_key": key["key"], "model": "doubao-seed-2-0-lite", "request_id": "x"},
        )
        assert other.status_code == 200, other.get_json()
        assert authorize_decisions("fast", "200", "allowed") == fast + 2


def test_the_limit_is_a_setting_in_limits_syntax(tmp_path: Path) -> None:
    runtime: Runtime = create_app(
        make_settings(tmp_path, auth_failure_rate_limit="7 per hour")
    ).extensions["billing"]
    assert (runtime.auth_failures.limit.amount, runtime.auth_failures.limit.get_expiry()) == (
        7,
        3600,
    )
    with pytest.raises(ValueError, match="auth_failure_rate_limit"):
        make_settings(tmp_path, auth_failure_rate_limit="often")
