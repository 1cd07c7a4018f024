"""API key settings over the admin API: rate limit, monthly cap, allowed models, expiry and name
as issued and as changed by PATCH, disabling and re-enabling, and what is refused."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.runtime import Runtime
from tests.api.admin.support import adjust, get_key, iso, new_account, patch, state_changes
from tests.support import assert_error, new_key


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- settings ------------------------------------------------------------------------------------


def test_rate_limit_defaults_to_the_configured_default(
    admin: FlaskClient, runtime: Runtime
) -> None:
    created = new_key(admin, new_account(admin))
    assert created["rate_limit"] == runtime.settings.default_rate_limit
    assert runtime.settings.default_rate_limit == "1 per 10 seconds"  # seed 000's limit


@pytest.mark.parametrize("rate_limit", ["60/minute", "1 per 10 seconds", None])
def test_an_explicit_rate_limit_or_null_is_kept(admin: FlaskClient, rate_limit: str | None) -> None:
    created = new_key(admin, new_account(admin), rate_limit=rate_limit)
    assert created["rate_limit"] == rate_limit
    assert get_key(admin, created["id"])["rate_limit"] == rate_limit


@pytest.mark.parametrize("rate_limit", ["lots", "", "60 per fortnight", 60])
def test_a_garbage_rate_limit_is_refused(admin: FlaskClient, rate_limit: Any) -> None:
    account_id = new_account(admin)
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/keys", json={"name": "k", "rate_limit": rate_limit}
    )
    assert_error(response, 400, "invalid_request", "rate_limit")
    assert admin.get(f"/admin/v1/accounts/{account_id}/keys").get_json()["data"] == []


def test_monthly_cap_is_an_exact_decimal_string(admin: FlaskClient) -> None:
    created = new_key(admin, new_account(admin), monthly_cap_usd="25.5")
    assert isinstance(created["monthly_cap_usd"], str)
    assert Decimal(created["monthly_cap_usd"]) == Decimal("25.5")
    assert new_key(admin, new_account(admin))["monthly_cap_usd"] is None


@pytest.mark.parametrize("cap", [25, 25.5])
def test_monthly_cap_as_a_json_number_is_refused(admin: FlaskClient, cap: Any) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{new_account(admin)}/keys", json={"name": "k", "monthly_cap_usd": cap}
    )
    error = assert_error(response, 400, "invalid_request", "monthly_cap_usd")
    assert "string" in error["message"]


@pytest.mark.parametrize("cap", ["-1", "abc", "1e3", "0.0000000001", "100000000000"])
def test_a_bad_monthly_cap_is_refused(admin: FlaskClient, cap: str) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{new_account(admin)}/keys", json={"name": "k", "monthly_cap_usd": cap}
    )
    assert_error(response, 400, "invalid_request", "monthly_cap_usd")


def test_allowed_models_resolve_aliases_and_dated_snapshots(admin: FlaskClient) -> None:
    created = new_key(
        admin,
        new_account(admin),
        allowed_models=[
            "doubao-seed-2.0-lite",
            "doubao-seed-2-0-code-preview-260215",
            "doubao-seed-2-0-lite",
        ],
    )
    assert sorted(created["allowed_models"]) == ["doubao-seed-2-0-code", "doubao-seed-2-0-lite"]
    assert get_key(admin, created["id"])["allowed_models"] == created["allowed_models"]


def test_allowed_models_default_to_all(admin: FlaskClient) -> None:
    assert new_key(admin, new_account(admin))["allowed_models"] is None


def test_an_unknown_allowed_model_is_model_not_found(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/keys",
        json={"name": "k", "allowed_models": ["doubao-seed-2-0-lite", "gpt-imaginary"]},
    )
    error = assert_error(response, 404, "model_not_found", "allowed_models")
    assert "gpt-imaginary" in error["message"]
    assert admin.get(f"/admin/v1/accounts/{account_id}/keys").get_json()["data"] == []


def test_expires_at_in_the_future_is_kept(admin: FlaskClient) -> None:
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=30)
    created = new_key(admin, new_account(admin), expires_at=iso(expires))
    assert parse_time(created["expires_at"]) == expires
    assert created["state"] == "insufficient_balance"


@pytest.mark.parametrize("delta", [dt.timedelta(seconds=-1), dt.timedelta(days=-365)])
def test_expires_at_in_the_past_is_refused(admin: FlaskClient, delta: dt.timedelta) -> None:
    expires = dt.datetime.now(dt.UTC) + delta
    response = admin.post(
        f"/admin/v1/accounts/{new_account(admin)}/keys",
        json={"name": "k", "expires_at": iso(expires)},
    )
    assert_error(response, 400, "invalid_request", "expires_at")


@pytest.mark.parametrize("value", ["2099-01-01T00:00:00", "tomorrow", "2099-13-01T00:00:00Z"])
def test_expires_at_must_be_an_rfc3339_time_with_an_offset(admin: FlaskClient, value: Any) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{new_account(admin)}/keys", json={"name": "k", "expires_at": value}
    )
    assert_error(response, 400, "invalid_request", "expires_at")


def test_missing_name_and_unknown_fields_are_refused(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    assert_error(
        admin.post(f"/admin/v1/accounts/{account_id}/keys", json={}), 400, "invalid_request", "name"
    )
    assert_error(
        admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "k", "scopes": ["all"]}),
        400,
        "invalid_request",
        "scopes",
    )
    assert_error(
        admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "   "}),
        400,
        "invalid_request",
        "name",
    )


def test_unknown_key_is_404(admin: FlaskClient) -> None:
    for response in (
        admin.get("/admin/v1/keys/key_nope"),
        admin.patch("/admin/v1/keys/key_nope", json={"name": "x"}),
        admin.post("/admin/v1/keys/key_nope/revoke"),
        admin.post("/admin/v1/keys/key_nope/rotate"),
    ):
        assert_error(response, 404, "not_found", "key_id")


# --- PATCH ---------------------------------------------------------------------------------------


def test_patch_changes_only_the_given_fields(admin: FlaskClient) -> None:
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=10)
    created = new_key(
        admin,
        new_account(admin),
        name="before",
        rate_limit="60/minute",
        monthly_cap_usd="5",
        allowed_models=["doubao-seed-2-0-mini"],
        expires_at=iso(expires),
    )
    original = get_key(admin, created["id"])

    renamed = patch(admin, created["id"], name="after")
    assert renamed.status_code == 200, renamed.get_json()
    assert renamed.get_json() == {**original, "name": "after"}
    assert get_key(admin, created["id"]) == {**original, "name": "after"}

    uncapped = patch(admin, created["id"], monthly_cap_usd=None, rate_limit="10/second")
    assert uncapped.status_code == 200, uncapped.get_json()
    assert uncapped.get_json() == {
        **original,
        "name": "after",
        "monthly_cap_usd": None,
        "rate_limit": "10/second",
    }

    later = expires + dt.timedelta(days=5)
    widened = patch(admin, created["id"], allowed_models=None, expires_at=iso(later))
    assert widened.status_code == 200, widened.get_json()
    body = widened.get_json()
    assert body["allowed_models"] is None
    assert parse_time(body["expires_at"]) == later
    assert body["rate_limit"] == "10/second"
    assert body["name"] == "after"


def test_an_empty_patch_changes_nothing(admin: FlaskClient) -> None:
    created = new_key(admin, new_account(admin), rate_limit="60/minute")
    original = get_key(admin, created["id"])
    response = patch(admin, created["id"])
    assert response.status_code == 200
    assert response.get_json() == original


@pytest.mark.parametrize(
    ("fields", "status", "code", "param"),
    [
        ({"name": None}, 400, "invalid_request", "name"),
        ({"name": ""}, 400, "invalid_request", "name"),
        ({"rate_limit": "lots"}, 400, "invalid_request", "rate_limit"),
        ({"monthly_cap_usd": 3}, 400, "invalid_request", "monthly_cap_usd"),
        ({"allowed_models": ["gpt-imaginary"]}, 404, "model_not_found", "allowed_models"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, 400, "invalid_request", "expires_at"),
        ({"disabled": "maybe"}, 400, "invalid_request", "disabled"),
        ({"colour": "red"}, 400, "invalid_request", "colour"),
    ],
)
def test_a_bad_patch_is_refused_and_changes_nothing(
    admin: FlaskClient, fields: dict[str, Any], status: int, code: str, param: str
) -> None:
    created = new_key(admin, new_account(admin), rate_limit="60/minute", monthly_cap_usd="5")
    original = get_key(admin, created["id"])
    assert_error(patch(admin, created["id"], **fields), status, code, param)
    assert get_key(admin, created["id"]) == original


def test_disable_and_re_enable(admin: FlaskClient, db: Session) -> None:
    account_id = new_account(admin)
    adjust(admin, account_id, "1")
    created = new_key(admin, account_id)
    assert created["state"] == "active"

    disabled = patch(admin, created["id"], disabled=True)
    assert disabled.status_code == 200
    assert (disabled.get_json()["state"], disabled.get_json()["http_status"]) == ("disabled", 401)
    assert get_key(admin, created["id"])["state"] == "disabled"

    # Disabled wins over a change of balance.
    adjust(admin, account_id, "-1")
    assert get_key(admin, created["id"])["state"] == "disabled"
    adjust(admin, account_id, "1")

    enabled = patch(admin, created["id"], disabled=False)
    assert (enabled.get_json()["state"], enabled.get_json()["http_status"]) == ("active", 200)

    transitions = [(old, new) for old, new, _ in state_changes(db, created["id"])]
    assert transitions == [(None, "active"), ("active", "disabled"), ("disabled", "active")]


def test_re_enabling_an_unfunded_key_returns_it_to_402(admin: FlaskClient) -> None:
    created = new_key(admin, new_account(admin))
    patch(admin, created["id"], disabled=True)
    enabled = patch(admin, created["id"], disabled=False).get_json()
    assert (enabled["state"], enabled["http_status"]) == ("insufficient_balance", 402)
