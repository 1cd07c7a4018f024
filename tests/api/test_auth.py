"""Every admin and customer route refuses a missing or wrong credential (DESIGN invariant 7)."""

from __future__ import annotations

import hashlib
import hmac
import re

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from billing.access.audit import AuditEntry
from billing.access.auth import Role, create_token
from billing.core.db import utcnow
from billing.runtime import Runtime
from tests.support import ERROR_KEYS, assert_error


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def admin_routes(app: Flask) -> list[tuple[str, str]]:
    """(method, concrete path) for every rule under /admin/, path parameters filled in."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/admin/"):
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", "some-id", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, path))
    return routes


def refusals(
    client: FlaskClient, routes: list[tuple[str, str]], headers: dict[str, str]
) -> list[str]:
    """The routes that did not answer an OpenAI-shaped 401 invalid_api_key to ``headers``."""
    failures = []
    for method, path in routes:
        response = client.open(path, method=method, headers=headers, json={})
        body = response.get_json(silent=True) or {}
        error = body.get("error") if isinstance(body, dict) else None
        ok = (
            response.status_code == 401
            and set(body) == {"error"}
            and isinstance(error, dict)
            and set(error) == ERROR_KEYS
            and error["code"] == "invalid_api_key"
            and error["message"]
        )
        if not ok:
            failures.append(
                f"{method} {path} -> {response.status_code} {response.get_data(as_text=True)[:200]}"
            )
    return failures


def audit_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(AuditEntry)) or 0


def test_the_admin_route_enumeration_is_not_empty(app: Flask) -> None:
    routes = admin_routes(app)
    # A sanity floor, so that the tests below cannot pass by checking nothing.
    assert ("POST", "/admin/v1/accounts") in routes
    assert ("PATCH", "/admin/v1/keys/some-id") in routes
    assert ("POST", "/admin/v1/accounts/some-id/adjustments") in routes
    assert len(routes) >= 10


def test_every_admin_route_refuses_missing_and_wrong_credentials(
    app: Flask, client: FlaskClient, db: Session, runtime: Runtime
) -> None:
    routes = admin_routes(app)
    bootstrap = runtime.settings.billing_admin_token
    assert bootstrap is not None
    before = audit_count(db)
    for headers in (
        {},
        bearer("wrong-token"),
        bearer(bootstrap.get_secret_value() + "x"),
        {"Authorization": f"Basic {bootstrap.get_secret_value()}"},  # right secret, wrong scheme
        {"Authorization": bootstrap.get_secret_value()},  # no scheme at all
        {"Authorization": "Bearer "},
    ):
        assert refusals(client, routes, headers) == [], headers
    assert audit_count(db) == before  # nothing was written behind a refused credential


def test_every_admin_route_refuses_gateway_and_revoked_admin_tokens(
    app: Flask, client: FlaskClient, db: Session, runtime: Runtime
) -> None:
    hmac_key = runtime.settings.hmac_key
    _, gateway_secret = create_token(
        db, role=Role.GATEWAY, name="gw", hmac_key=hmac_key, now=utcnow()
    )
    revoked, revoked_secret = create_token(
        db, role=Role.ADMIN, name="old", hmac_key=hmac_key, now=utcnow()
    )
    # Works before it is revoked, so the refusal below is the revocation's doing.
    assert client.get("/admin/v1/accounts", headers=bearer(revoked_secret)).status_code == 200
    revoked.revoked_at = utcnow()
    db.flush()

    routes = admin_routes(app)
    assert refusals(client, routes, bearer(gateway_secret)) == []
    assert refusals(client, routes, bearer(revoked_secret)) == []


def test_a_created_admin_token_works_and_is_the_recorded_actor(
    client: FlaskClient, db: Session, runtime: Runtime
) -> None:
    token, secret = create_token(
        db, role=Role.ADMIN, name="operator", hmac_key=runtime.settings.hmac_key, now=utcnow()
    )
    created = client.post("/admin/v1/accounts", json={"name": "via token"}, headers=bearer(secret))
    assert created.status_code == 201, created.get_json()
    fetched = client.get(f"/admin/v1/accounts/{created.get_json()['id']}", headers=bearer(secret))
    assert fetched.status_code == 200
    assert fetched.get_json()["name"] == "via token"

    newest = client.get("/admin/v1/audit-log", query_string={"limit": 1}, headers=bearer(secret))
    entry = newest.get_json()["data"][0]
    assert entry["actor"] == token.id
    assert entry["target_id"] == created.get_json()["id"]
    assert secret not in newest.get_data(as_text=True)


def test_the_database_stores_only_the_keyed_hash_of_a_token(db: Session, runtime: Runtime) -> None:
    hmac_key = runtime.settings.hmac_key
    token, secret = create_token(
        db, role=Role.ADMIN, name="hash me", hmac_key=hmac_key, now=utcnow()
    )
    row = (
        db.execute(text("SELECT * FROM service_tokens WHERE id = :id"), {"id": token.id})
        .mappings()
        .one()
    )
    random_part = secret.split("_", 1)[1]
    for column, value in row.items():
        assert secret not in str(value), column
        assert random_part not in str(value), column
    assert row["token_hash"] == hmac.new(hmac_key, secret.encode(), hashlib.sha256).hexdigest()


def test_customer_models_refuses_missing_garbage_and_non_sk_keys(
    admin: FlaskClient, client: FlaskClient, runtime: Runtime
) -> None:
    account = admin.post("/admin/v1/accounts", json={"name": "customer"}).get_json()
    key = admin.post(f"/admin/v1/accounts/{account['id']}/keys", json={"name": "k"}).get_json()[
        "key"
    ]
    bootstrap = runtime.settings.billing_admin_token
    assert bootstrap is not None
    # The real key works (the refusals below are about the credential, not the route).
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200

    for headers in (
        {},
        bearer("garbage"),
        bearer("sk-" + "A" * 48),  # well-formed, but no such key
        bearer(key + "x"),
        bearer(bootstrap.get_secret_value()),  # an admin token is not an API key
        bearer(key.removeprefix("sk-")),
        {"Authorization": f"Basic {key}"},
        {"Authorization": "Bearer "},
    ):
        assert_error(client.get("/v1/models", headers=headers), 401, "invalid_api_key")
