"""Every gateway route refuses a missing or wrong credential, and gateway tokens made over the
admin API work, are shown once, are listed masked and can be revoked (DESIGN invariant 7)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from billing.access.auth import Role, create_token
from billing.core.db import utcnow
from billing.metering.usage_events import UsageEvent
from billing.runtime import Runtime
from tests.support import ERROR_KEYS, assert_error


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def gateway_routes(app: Flask) -> list[tuple[str, str]]:
    """(method, concrete path) for every rule under /gateway/, path parameters filled in."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/gateway/"):
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", "some-id", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, path))
    return sorted(routes)


def refusals(
    client: FlaskClient, routes: list[tuple[str, str]], headers: dict[str, str], body: Any
) -> list[str]:
    """The routes that did not answer an OpenAI-shaped 401 invalid_api_key to ``headers``."""
    failures = []
    for method, path in routes:
        response = client.open(path, method=method, headers=headers, json=body)
        payload = response.get_json(silent=True) or {}
        error = payload.get("error") if isinstance(payload, dict) else None
        ok = (
            response.status_code == 401
            and set(payload) == {"error"}
            and isinstance(error, dict)
            and set(error) == ERROR_KEYS
            and error["code"] == "invalid_api_key"
            and error["type"] == "invalid_request_error"
            and isinstance(error["message"], str)
            and error["message"]
        )
        if not ok:
            failures.append(
                f"{method} {path} -> {response.status_code} {response.get_data(as_text=True)[:200]}"
            )
    return failures


def event_count(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(UsageEvent)) or 0


def funded_key(admin: FlaskClient) -> str:
    """A funded customer key, so a usage report with it is valid in every respect but the token."""
    account = admin.post("/admin/v1/accounts", json={"name": "gw auth"}).get_json()["id"]
    response = admin.post(
        f"/admin/v1/accounts/{account}/adjustments",
        json={"amount_usd": "5", "reason": "test"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201
    created = admin.post(f"/admin/v1/accounts/{account}/keys", json={"name": "k"})
    assert created.status_code == 201
    return created.get_json()["key"]


def usage_event(api_key: str) -> dict[str, Any]:
    return {
        "request_id": f"req-{uuid.uuid4()}",
        "api_key": api_key,
        "model": "doubao-seed-2-0-mini",
        "input_tokens": 100,
        "output_tokens": 10,
    }


def create_gateway_token(admin: FlaskClient, name: str = "edge") -> dict[str, Any]:
    response = admin.post("/admin/v1/gateway-tokens", json={"name": name})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_the_gateway_route_enumeration_is_not_empty(app: Flask) -> None:
    routes = gateway_routes(app)
    # A floor, so that the tests below cannot pass by checking nothing.
    assert ("POST", "/gateway/v1/usage") in routes
    assert all(path.startswith("/gateway/v1/") for _, path in routes)


def test_every_gateway_route_refuses_missing_and_wrong_credentials(
    app: Flask, admin: FlaskClient, client: FlaskClient, db: Session, runtime: Runtime
) -> None:
    routes = gateway_routes(app)
    bootstrap = runtime.settings.billing_gateway_token
    assert bootstrap is not None
    secret = bootstrap.get_secret_value()
    event = usage_event(funded_key(admin))
    before = event_count(db)
    for headers in (
        {},
        bearer("wrong-token"),
        bearer(secret + "x"),
        bearer(secret[:-1]),
        {"Authorization": f"Basic {secret}"},  # right secret, wrong scheme
        {"Authorization": secret},  # no scheme at all
        {"Authorization": "Bearer "},
    ):
        assert refusals(client, routes, headers, event) == [], headers
    assert event_count(db) == before  # nothing was stored behind a refused credential

    # The very same report with the right token is accepted: the refusals were the token's doing.
    accepted = client.post("/gateway/v1/usage", json=event, headers=bearer(secret))
    assert accepted.status_code == 202, accepted.get_json()
    assert accepted.get_json()["accepted"] == 1
    assert event_count(db) == before + 1


def test_every_gateway_route_refuses_admin_tokens(
    app: Flask, admin: FlaskClient, client: FlaskClient, db: Session, runtime: Runtime
) -> None:
    routes = gateway_routes(app)
    bootstrap_admin = runtime.settings.billing_admin_token
    assert bootstrap_admin is not None
    _, admin_secret = create_token(
        db, role=Role.ADMIN, name="operator", hmac_key=runtime.settings.hmac_key, now=utcnow()
    )
    # The created admin token is a working admin credential...
    assert client.get("/admin/v1/accounts", headers=bearer(admin_secret)).status_code == 200
    event = usage_event(funded_key(admin))
    before = event_count(db)
    # ...but neither it nor the bootstrap admin token is a gateway credential.
    for secret in (bootstrap_admin.get_secret_value(), admin_secret):
        assert refusals(client, routes, bearer(secret), event) == []
    assert event_count(db) == before


def test_every_gateway_route_refuses_a_revoked_gateway_token(
    app: Flask, admin: FlaskClient, client: FlaskClient, db: Session
) -> None:
    routes = gateway_routes(app)
    token = create_gateway_token(admin, "soon revoked")
    event = usage_event(funded_key(admin))
    # It works before it is revoked, so the refusals below are the revocation's doing.
    first = client.post("/gateway/v1/usage", json=event, headers=bearer(token["token"]))
    assert first.status_code == 202 and first.get_json()["accepted"] == 1

    revoked = admin.post(f"/admin/v1/gateway-tokens/{token['id']}/revoke")
    assert revoked.status_code == 200
    before = event_count(db)
    assert refusals(client, routes, bearer(token["token"]), usage_event(event["api_key"])) == []
    assert event_count(db) == before


def test_a_gateway_token_from_the_admin_api_is_shown_once_listed_masked_and_revocable(
    admin: FlaskClient, client: FlaskClient, db: Session
) -> None:
    api_key = funded_key(admin)
    created = create_gateway_token(admin, "edge-eu-1")
    secret = created["token"]
    assert secret.startswith("gw_") and len(secret) >= 43
    assert created["object"] == "gateway_token"
    assert created["name"] == "edge-eu-1"
    assert created["revoked_at"] is None
    assert created["masked_token"] == f"{secret[:7]}...{secret[-4:]}"
    assert secret not in created["masked_token"]

    # It works on the gateway API.
    report = client.post("/gateway/v1/usage", json=usage_event(api_key), headers=bearer(secret))
    assert report.status_code == 202, report.get_json()
    assert report.get_json()["accepted"] == 1

    # Listed masked: never the secret again, not in the list nor in the audit log.
    listed = admin.get("/admin/v1/gateway-tokens")
    assert listed.status_code == 200
    mine = [item for item in listed.get_json()["data"] if item["id"] == created["id"]]
    assert mine == [{key: value for key, value in created.items() if key != "token"}]
    audit = admin.get("/admin/v1/audit-log", query_string={"limit": 100})
    for response in (listed, audit):
        assert secret not in response.get_data(as_text=True)
        assert secret[3:] not in response.get_data(as_text=True)
    row = (
        db.execute(text("SELECT * FROM service_tokens WHERE id = :id"), {"id": created["id"]})
        .mappings()
        .one()
    )
    assert row["role"] == "gateway"
    assert all(secret[3:] not in str(value) for value in row.values())

    # A second token is independent of the first.
    other = create_gateway_token(admin, "edge-us-1")
    assert other["token"] != secret

    revoked = admin.post(f"/admin/v1/gateway-tokens/{created['id']}/revoke")
    assert revoked.status_code == 200
    assert revoked.get_json()["revoked_at"] is not None
    assert "token" not in revoked.get_json()
    again = admin.post(f"/admin/v1/gateway-tokens/{created['id']}/revoke")
    assert again.status_code == 200
    assert again.get_json()["revoked_at"] == revoked.get_json()["revoked_at"]

    refused = client.post("/gateway/v1/usage", json=usage_event(api_key), headers=bearer(secret))
    assert_error(refused, 401, "invalid_api_key")
    still = client.post(
        "/gateway/v1/usage", json=usage_event(api_key), headers=bearer(other["token"])
    )
    assert still.status_code == 202 and still.get_json()["accepted"] == 1

    relisted = {
        item["id"]: item for item in admin.get("/admin/v1/gateway-tokens").get_json()["data"]
    }
    assert relisted[created["id"]]["revoked_at"] == revoked.get_json()["revoked_at"]
    assert relisted[other["id"]]["revoked_at"] is None


def test_gateway_token_admin_errors(
    admin: FlaskClient, client: FlaskClient, db: Session, runtime: Runtime
) -> None:
    assert_error(admin.post("/admin/v1/gateway-tokens/tok_nope/revoke"), 404, "not_found")
    empty = admin.post("/admin/v1/gateway-tokens", json={"name": ""})
    assert assert_error(empty, 400, "invalid_request")["param"] == "name"
    # An admin token is not revoked through the gateway-token route.
    admin_token, admin_secret = create_token(
        db, role=Role.ADMIN, name="op", hmac_key=runtime.settings.hmac_key, now=utcnow()
    )
    assert_error(admin.post(f"/admin/v1/gateway-tokens/{admin_token.id}/revoke"), 404, "not_found")
    assert client.get("/admin/v1/accounts", headers=bearer(admin_secret)).status_code == 200
    # A gateway token does not manage gateway tokens (or anything else of the admin API).
    token = create_gateway_token(admin)
    for headers in ({}, bearer(token["token"])):
        assert_error(
            client.post("/admin/v1/gateway-tokens", json={"name": "x"}, headers=headers),
            401,
            "invalid_api_key",
        )
        assert_error(
            client.get("/admin/v1/gateway-tokens", headers=headers), 401, "invalid_api_key"
        )
