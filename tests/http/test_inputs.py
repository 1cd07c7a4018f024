"""What every request must be before a view reads it (``billing.http.inputs``): a body within
``MAX_CONTENT_LENGTH``, strict JSON (no duplicate keys, not nested past the limit), and no NUL
in the URL. Issue #10, observations 2 (deep JSON, NUL in query and path), 4 (body size) and 7
(duplicate keys)."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.app import create_app
from billing.http.inputs import MAX_JSON_DEPTH, InvalidJson, parse_json
from billing.ledger.ledger import LedgerEntry
from billing.metering.usage_events import MAX_BATCH
from tests.conftest import make_settings
from tests.support import HugeBody, assert_error, new_key

FIFTY_MB = 50 * 1024 * 1024


def nested(depth: int) -> str:
    """A JSON document of ``depth`` objects, each inside the one before."""
    return '{"a":' * depth + "1" + "}" * depth


# --- duplicate keys -----------------------------------------------------------------------------


def test_a_duplicate_amount_credits_nothing_and_names_the_key(
    admin: FlaskClient, db: Session
) -> None:
    account = admin.post("/admin/v1/accounts", json={"name": "dup"}).get_json()
    response = admin.post(
        f"/admin/v1/accounts/{account['id']}/adjustments",
        data='{"amount_usd":"1.00","amount_usd":"2.00","reason":"r"}',
        content_type="application/json",
        headers={"Idempotency-Key": "dup-1"},
    )
    error = assert_error(response, 400, "invalid_json", "amount_usd")
    assert '"amount_usd" more than once' in error["message"]
    assert not db.scalars(select(LedgerEntry).where(LedgerEntry.account_id == account["id"])).all()
    assert admin.get(f"/admin/v1/accounts/{account['id']}").get_json()["balance_usd"] == (
        "0.000000000"
    )


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/admin/v1/accounts", '{"name":"a","name":"b"}', "name"),
        ("/gateway/v1/usage", '{"events":[{"request_id":"r","request_id":"s"}]}', "request_id"),
        ("/gateway/v1/usage", '{"events":[],"events":[]}', "events"),
        ("/gateway/v1/violations", '{"category":"x","category":"y"}', "category"),
        ("/gateway/v1/authorize", '{"model":"a","model":"b"}', "model"),
    ],
)
def test_a_duplicate_key_is_refused_on_every_json_body(
    admin: FlaskClient, gateway: FlaskClient, path: str, body: str, key: str
) -> None:
    client = admin if path.startswith("/admin/") else gateway
    response = client.post(path, data=body, content_type="application/json")
    error = assert_error(response, 400, "invalid_json", key)
    assert f'"{key}" more than once' in error["message"]


# --- nesting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/admin/v1/accounts", "/gateway/v1/usage", "/gateway/v1/authorize"]
)
def test_json_nested_100000_deep_is_a_400_saying_so(
    admin: FlaskClient, gateway: FlaskClient, path: str
) -> None:
    client = admin if path.startswith("/admin/") else gateway
    response = client.post(
        path, data="[" * 100_000 + "]" * 100_000, content_type="application/json"
    )
    error = assert_error(response, 400, "invalid_json")
    assert f"nested more than {MAX_JSON_DEPTH} levels deep" in error["message"]


def test_nesting_up_to_the_limit_is_json_and_one_more_level_is_refused() -> None:
    assert parse_json(nested(MAX_JSON_DEPTH).encode())["a"]["a"]
    with pytest.raises(InvalidJson, match="nested more than"):
        parse_json(nested(MAX_JSON_DEPTH + 1).encode())


def test_a_usage_object_nested_deep_within_the_limit_is_refused_per_item(
    admin: FlaskClient, gateway: FlaskClient
) -> None:
    account = admin.post("/admin/v1/accounts", json={"name": "deep"}).get_json()
    key = new_key(admin, account["id"])
    deep = {"request_id": str(uuid.uuid4()), "key_id": key["id"], "model": "doubao-seed-2-0-lite"}
    body = '{"events":[' + json.dumps(deep)[:-1] + ',"usage":' + nested(150) + "}]}"
    response = gateway.post("/gateway/v1/usage", data=body, content_type="application/json")
    assert response.status_code == 202, response.get_data(as_text=True)
    [rejected] = response.get_json()["rejected"]
    assert rejected["error"]["param"].startswith("events[0].usage")


@pytest.mark.parametrize(
    "raw",
    [b'{"name": "\xff"}', b'{"name": "\\ud800"}', b'{"name": NaN}', b'\xef\xbb\xbf{"name":"x"}'],
)
def test_what_is_not_strict_json_is_invalid_json(admin: FlaskClient, raw: bytes) -> None:
    response = admin.post("/admin/v1/accounts", data=raw, content_type="application/json")
    assert_error(response, 400, "invalid_json")


# --- body size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/gateway/v1/authorize", {}),
        ("/gateway/v1/authorize", {"Authorization": "Bearer not-a-token"}),
        ("/stripe/webhook", {"Stripe-Signature": "t=1,v1=00"}),
        ("/admin/v1/accounts", {}),
    ],
)
def test_a_50_mb_body_is_answered_413_without_being_read(
    client: FlaskClient, path: str, headers: dict[str, str]
) -> None:
    body = HugeBody(FIFTY_MB)
    response = client.post(
        path,
        content_type="application/json",
        headers=headers,
        environ_overrides={"wsgi.input": body, "CONTENT_LENGTH": str(FIFTY_MB)},
    )
    error = assert_error(response, 413, "request_too_large")
    assert "MAX_CONTENT_LENGTH" in error["message"]
    assert body.read_bytes == 0


def test_a_body_without_a_length_is_cut_off_at_the_limit(admin: FlaskClient, app: Flask) -> None:
    limit = app.config["MAX_CONTENT_LENGTH"]
    body = HugeBody(FIFTY_MB)
    response = admin.post(
        "/admin/v1/accounts",
        content_type="application/json",
        # Sent chunked, so without a length, in a stream that ends by itself (as gunicorn has it).
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": body, "wsgi.input_terminated": True},
    )
    assert_error(response, 413, "request_too_large")
    assert body.read_bytes <= limit + 64 * 1024


def test_a_body_without_a_length_within_the_limit_reaches_the_view_whole(
    admin: FlaskClient,
) -> None:
    body = json.dumps({"name": "chunked", "email": "c@acme.test"}).encode()
    response = admin.post(
        "/admin/v1/accounts",
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True},
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["email"] == "c@acme.test"


def test_the_limit_is_configurable(tmp_path: Path) -> None:
    small = create_app(make_settings(tmp_path, max_content_length=64 * 1024))
    response = small.test_client().post(
        "/admin/v1/accounts", data=b" " * (64 * 1024 + 1), content_type="application/json"
    )
    assert_error(response, 413, "request_too_large")
    assert "65536 bytes" in response.get_json()["error"]["message"]


def longest_batch() -> bytes:
    """A usage batch of the most events, each with every field at its longest."""
    event: dict[str, Any] = {
        "request_id": "r" * 200,
        "api_key": "sk-" + "A" * 197,
        "model": "m" * 200,
        "usage": {
            "prompt_tokens": 100_000_000,
            "completion_tokens": 100_000_000,
            "total_tokens": 200_000_000,
            "prompt_tokens_details": {"cached_tokens": 100_000_000, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 100_000_000,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "occurred_at": "2026-12-02T10:00:00.123456+00:00",
        "outcome": "client_disconnected",
    }
    return json.dumps({"events": [event] * MAX_BATCH}).encode()


def test_a_full_usage_batch_with_every_field_at_its_longest_fits(
    app: Flask, gateway: FlaskClient, db: Session
) -> None:
    body = longest_batch()
    assert len(body) < app.config["MAX_CONTENT_LENGTH"] * 0.6
    response = gateway.post("/gateway/v1/usage", data=body, content_type="application/json")
    assert response.status_code == 202, response.get_data(as_text=True)[:500]
    assert len(response.get_json()["rejected"]) == MAX_BATCH  # an unknown key, read in full


# --- NUL in the URL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/admin/v1/accounts/%00", "account_id"),
        ("/admin/v1/accounts/acct%00x/keys", "account_id"),
        ("/admin/v1/keys/%00/violations", "key_id"),
        ("/admin/v1/usage/events/%00", "request_id"),
        ("/admin/v1/usage?account_id=%00", "account_id"),
        ("/admin/v1/usage?model=lite%00&group_by=model", "model"),
        ("/admin/v1/accounts?cursor=%00", "cursor"),
    ],
)
def test_a_nul_in_a_path_or_query_parameter_is_a_400_naming_it(
    admin: FlaskClient, db: Session, path: str, param: str
) -> None:
    error = assert_error(admin.get(path), 400, "invalid_request", param)
    assert "NUL" in error["message"]


def test_a_nul_in_a_query_parameter_is_refused_before_the_credentials(
    client: FlaskClient,
) -> None:
    response = client.get("/v1/dashboard/billing/usage?start_date=2026-12-01%00")
    assert_error(response, 400, "invalid_request", "start_date")


def test_a_nul_in_a_page_parameter_is_refused(client: FlaskClient, db: Session) -> None:
    page = client.get("/billing?payment=%00")
    assert page.status_code == 400
    assert page.mimetype == "text/html"
    balance = client.get("/billing/balance?payment=pay%00")
    assert_error(balance, 400, "invalid_request", "payment")
