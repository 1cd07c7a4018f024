"""Webhook endpoints through the admin API: registered with a secret shown once, listed without
it, validated, disabled; deliveries listed and inspected (DESIGN 6.4, 7 and 8)."""

from __future__ import annotations

import base64
import json

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.access.audit import AuditEntry
from billing.notify import models
from tests.notify.conftest import Receiver, new_account, new_key, register
from tests.support import assert_error

ENDPOINTS = "/admin/v1/webhook-endpoints"
ALL_TYPES = [
    "account.balance_depleted",
    "account.balance_low",
    "auto_recharge.failed",
    "key.created",
    "key.state_changed",
    "topup.succeeded",
]


def test_an_endpoint_is_created_with_its_secret_shown_once(admin: FlaskClient, db: Session) -> None:
    response = admin.post(ENDPOINTS, json={"url": "https://gw.example.com/hooks"})
    assert response.status_code == 201
    created = response.get_json()
    assert created["id"].startswith("whe_")
    assert created["url"] == "https://gw.example.com/hooks"
    assert created["event_types"] == ALL_TYPES  # default: every type
    assert created["disabled_at"] is None
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32

    listed = admin.get(ENDPOINTS).get_json()
    mine = [item for item in listed["data"] if item["id"] == created["id"]]
    assert len(mine) == 1
    assert "secret" not in mine[0]
    assert secret not in json.dumps(listed)

    # Not stored either: the row keeps only a salt, and the audit log only the request.
    row = db.get(models.WebhookEndpoint, created["id"])
    assert row is not None
    assert secret not in json.dumps({c.name: str(getattr(row, c.name)) for c in row.__table__.c})
    audit = db.scalars(select(AuditEntry).where(AuditEntry.target_id == created["id"])).one()
    assert audit.action == "POST /admin/v1/webhook-endpoints"
    assert secret not in json.dumps(audit.request)


def test_two_endpoints_get_different_secrets(admin: FlaskClient) -> None:
    first = admin.post(ENDPOINTS, json={"url": "http://127.0.0.1:9/a"}).get_json()
    second = admin.post(ENDPOINTS, json={"url": "http://127.0.0.1:9/a"}).get_json()
    assert first["secret"] != second["secret"]


def test_event_types_are_a_subset_of_the_known_ones(admin: FlaskClient) -> None:
    response = admin.post(
        ENDPOINTS,
        json={
            "url": "https://gw.example.com/hooks",
            "event_types": ["key.state_changed", "key.state_changed"],
        },
    )
    assert response.status_code == 201
    assert response.get_json()["event_types"] == ["key.state_changed"]
    # Every known type may be named, the payment ones and key.created too.
    every = admin.post(ENDPOINTS, json={"url": "https://gw.example.com", "event_types": ALL_TYPES})
    assert every.status_code == 201, every.get_json()
    assert every.get_json()["event_types"] == ALL_TYPES

    unknown = admin.post(
        ENDPOINTS, json={"url": "https://gw.example.com/h", "event_types": ["key.deleted"]}
    )
    assert_error(unknown, 400, "invalid_request", "event_types.0")
    empty = admin.post(ENDPOINTS, json={"url": "https://gw.example.com/h", "event_types": []})
    assert_error(empty, 400, "invalid_request", "event_types")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://gw.example.com/hooks",
        "gw.example.com/hooks",
        "https:///hooks",
        "javascript:alert(1)",
        "https://user:pass@gw.example.com/hooks",
        "http://gw.example.com:99999/hooks",
        "",
    ],
)
def test_only_http_and_https_urls_with_a_host_are_accepted(admin: FlaskClient, url: str) -> None:
    assert_error(admin.post(ENDPOINTS, json={"url": url}), 400, "invalid_request", "url")


def test_unknown_fields_are_refused(admin: FlaskClient) -> None:
    response = admin.post(ENDPOINTS, json={"url": "https://gw.example.com/h", "secret": "mine"})
    assert_error(response, 400, "invalid_request", "secret")


def test_a_disabled_endpoint_gets_nothing_new_and_its_pending_deliveries_fail(
    admin: FlaskClient, db: Session, receiver: Receiver
) -> None:
    endpoint_id = register(admin, receiver, ["key.created"])
    account_id = new_account(admin)
    new_key(admin, account_id)  # a new key is announced
    [pending] = admin.get(f"{ENDPOINTS}/{endpoint_id}/deliveries").get_json()["data"]
    assert pending["status"] == "pending"

    response = admin.post(f"{ENDPOINTS}/{endpoint_id}/disable")
    assert response.status_code == 200
    assert response.get_json()["disabled_at"] is not None
    again = admin.post(f"{ENDPOINTS}/{endpoint_id}/disable")
    assert again.get_json()["disabled_at"] == response.get_json()["disabled_at"]

    failed = admin.get(f"/admin/v1/webhook-deliveries/{pending['id']}").get_json()
    assert failed["status"] == "failed"
    assert failed["last_error"] == "endpoint disabled"
    assert failed["next_attempt_at"] is None

    new_key(admin, account_id)
    assert len(admin.get(f"{ENDPOINTS}/{endpoint_id}/deliveries").get_json()["data"]) == 1
    replay = admin.post(f"/admin/v1/webhook-deliveries/{pending['id']}/replay")
    assert_error(replay, 409, "endpoint_disabled")
    assert receiver.requests() == []


def test_deliveries_are_listed_newest_first_with_a_cursor_and_a_status_filter(
    admin: FlaskClient, receiver: Receiver
) -> None:
    endpoint_id = register(admin, receiver, ["key.created"])
    account_id = new_account(admin)
    for _ in range(3):
        new_key(admin, account_id)
    first = admin.get(f"{ENDPOINTS}/{endpoint_id}/deliveries?limit=2").get_json()
    assert [item["status"] for item in first["data"]] == ["pending", "pending"]
    assert first["data"][0]["id"] > first["data"][1]["id"]
    assert first["data"][0]["event_type"] == "key.created"
    assert first["data"][0]["event_id"].startswith("msg_")
    rest = admin.get(
        f"{ENDPOINTS}/{endpoint_id}/deliveries?limit=2&cursor={first['next_cursor']}"
    ).get_json()
    assert len(rest["data"]) == 1
    assert rest["data"][0]["id"] < first["data"][1]["id"]
    assert rest["next_cursor"] is None
    succeeded = admin.get(f"{ENDPOINTS}/{endpoint_id}/deliveries?status=succeeded").get_json()
    assert succeeded["data"] == []


def test_unknown_endpoints_and_deliveries_are_404(admin: FlaskClient) -> None:
    assert_error(admin.post(f"{ENDPOINTS}/whe_nope/disable"), 404, "not_found", "endpoint_id")
    assert_error(admin.get(f"{ENDPOINTS}/whe_nope/deliveries"), 404, "not_found", "endpoint_id")
    assert_error(admin.get("/admin/v1/webhook-deliveries/999999999"), 404, "not_found")
    assert_error(admin.post("/admin/v1/webhook-deliveries/999999999/replay"), 404, "not_found")
    assert_error(admin.get("/admin/v1/webhook-deliveries/abc"), 400, "invalid_request")


def test_webhook_routes_refuse_a_missing_admin_token(client: FlaskClient) -> None:
    for method, path in [
        ("POST", ENDPOINTS),
        ("GET", ENDPOINTS),
        ("POST", f"{ENDPOINTS}/whe_x/disable"),
        ("GET", f"{ENDPOINTS}/whe_x/deliveries"),
        ("GET", "/admin/v1/webhook-deliveries/1"),
        ("POST", "/admin/v1/webhook-deliveries/1/replay"),
    ]:
        response = client.open(path, method=method, json={"url": "https://gw.example.com/h"})
        assert_error(response, 401, "invalid_api_key")
