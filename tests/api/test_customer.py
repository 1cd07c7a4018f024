"""The OpenAI-compatible ``GET /v1/models`` called with a customer's own key."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from billing.accounts.keys import ApiKey
from billing.catalog import catalog
from tests.support import ERROR_KEYS

SEED = json.loads(catalog.default_price_file().read_text())


def assert_invalid_key(response: Any) -> None:
    assert response.status_code == 401, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def new_key(admin: FlaskClient, **fields: Any) -> dict[str, Any]:
    account = admin.post("/admin/v1/accounts", json={"name": "customer"}).get_json()
    response = admin.post(f"/admin/v1/accounts/{account['id']}/keys", json={"name": "k", **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_a_fresh_key_at_402_lists_the_priced_models(
    admin: FlaskClient, client: FlaskClient
) -> None:
    key = new_key(admin)
    assert key["http_status"] == 402  # unfunded, and still allowed to look at the price list
    # An unpriced model (its only price starts tomorrow) must not be offered.
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    unpriced = admin.post(
        "/admin/v1/models",
        json={
            "id": "not-yet-priced",
            "input_price_per_m": "1",
            "output_price_per_m": "1",
            "effective_from": tomorrow,
        },
    )
    assert unpriced.status_code == 201

    response = client.get("/v1/models", headers=bearer(key["key"]))
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    listed = {model["id"]: model for model in body["data"]}
    admin_view = admin.get("/admin/v1/models").get_json()["data"]
    assert set(listed) == {model["id"] for model in admin_view if model["pricing"] is not None}
    assert "not-yet-priced" in {model["id"] for model in admin_view}
    assert "not-yet-priced" not in listed

    for seed in SEED["models"]:
        model = listed[seed["id"]]
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert isinstance(model["owned_by"], str)
        pricing = model["pricing"]
        assert isinstance(pricing["input_price_per_m"], str)
        assert isinstance(pricing["output_price_per_m"], str)
        assert Decimal(pricing["input_price_per_m"]) == Decimal(seed["input_price_per_m"])
        assert Decimal(pricing["output_price_per_m"]) == Decimal(seed["output_price_per_m"])
    assert key["key"] not in response.get_data(as_text=True)


def test_a_funded_key_sees_the_same_list(admin: FlaskClient, client: FlaskClient) -> None:
    key = new_key(admin)
    unfunded = client.get("/v1/models", headers=bearer(key["key"])).get_json()
    admin.post(
        f"/admin/v1/accounts/{key['account_id']}/adjustments",
        json={"amount_usd": "1", "reason": "top up"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert admin.get(f"/admin/v1/keys/{key['id']}").get_json()["http_status"] == 200
    assert client.get("/v1/models", headers=bearer(key["key"])).get_json() == unfunded


def test_a_revoked_key_is_refused(admin: FlaskClient, client: FlaskClient) -> None:
    key = new_key(admin)
    assert client.get("/v1/models", headers=bearer(key["key"])).status_code == 200
    assert admin.post(f"/admin/v1/keys/{key['id']}/revoke").status_code == 200
    assert_invalid_key(client.get("/v1/models", headers=bearer(key["key"])))


def test_a_disabled_key_is_refused_until_re_enabled(
    admin: FlaskClient, client: FlaskClient
) -> None:
    key = new_key(admin)
    assert admin.patch(f"/admin/v1/keys/{key['id']}", json={"disabled": True}).status_code == 200
    assert_invalid_key(client.get("/v1/models", headers=bearer(key["key"])))
    assert admin.patch(f"/admin/v1/keys/{key['id']}", json={"disabled": False}).status_code == 200
    assert client.get("/v1/models", headers=bearer(key["key"])).status_code == 200


def test_an_expired_key_is_refused(admin: FlaskClient, client: FlaskClient, db: Session) -> None:
    key = new_key(admin)
    db.execute(
        update(ApiKey)
        .where(ApiKey.id == key["id"])
        .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    )
    assert_invalid_key(client.get("/v1/models", headers=bearer(key["key"])))


def test_a_rotated_away_secret_is_refused(admin: FlaskClient, client: FlaskClient) -> None:
    key = new_key(admin)
    rotated = admin.post(f"/admin/v1/keys/{key['id']}/rotate").get_json()
    assert_invalid_key(client.get("/v1/models", headers=bearer(key["key"])))
    assert client.get("/v1/models", headers=bearer(rotated["key"])).status_code == 200
