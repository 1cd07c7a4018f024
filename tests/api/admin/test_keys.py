"""API keys over the admin API: issue, show once, states, settings, revoke, rotate, expiry."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from billing.accounts import keys
from billing.accounts.keys import ApiKey, KeyStateChange
from billing.runtime import Runtime
from tests.support import assert_error, new_key

KEY_FORMAT = re.compile(r"sk-[0-9A-Za-z]{40,}")


def new_account(admin: FlaskClient) -> str:
    response = admin.post("/admin/v1/accounts", json={"name": "key owner"})
    assert response.status_code == 201
    return response.get_json()["id"]  # type: ignore[no-any-return]


def adjust(admin: FlaskClient, account_id: str, amount: str) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": amount, "reason": "test"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.get_json()


def get_key(admin: FlaskClient, key_id: str) -> dict[str, Any]:
    response = admin.get(f"/admin/v1/keys/{key_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def patch(admin: FlaskClient, key_id: str, **fields: Any) -> Any:
    return admin.patch(f"/admin/v1/keys/{key_id}", json=fields)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def state_changes(db: Session, key_id: str) -> list[tuple[str | None, str, str]]:
    rows = db.execute(
        select(KeyStateChange.old_state, KeyStateChange.new_state, KeyStateChange.reason)
        .where(KeyStateChange.key_id == key_id)
        .order_by(KeyStateChange.id)
    )
    return [(old, new, reason) for old, new, reason in rows]


# --- the secret is shown once and stored only as a keyed hash ------------------------------------


def test_the_secret_is_returned_once_and_never_again(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    created = new_key(admin, account_id, name="primary")
    secret = created["key"]
    assert KEY_FORMAT.fullmatch(secret), secret
    assert created["object"] == "api_key"
    assert created["account_id"] == account_id
    assert created["name"] == "primary"
    assert created["masked_key"].endswith(secret[-4:])
    assert created["masked_key"].startswith("sk-")
    assert secret not in created["masked_key"]

    fetched = admin.get(f"/admin/v1/keys/{created['id']}")
    listed = admin.get(f"/admin/v1/accounts/{account_id}/keys")
    for response in (fetched, listed):
        assert response.status_code == 200
        assert secret not in response.get_data(as_text=True)
        assert secret[3:] not in response.get_data(as_text=True)
    assert "key" not in fetched.get_json()
    assert [item["id"] for item in listed.get_json()["data"]] == [created["id"]]
    assert "key" not in listed.get_json()["data"][0]
    without_secret = {field: value for field, value in created.items() if field != "key"}
    assert fetched.get_json() == without_secret


def test_two_keys_have_different_secrets(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    first, second = new_key(admin, account_id), new_key(admin, account_id)
    assert first["key"] != second["key"]
    assert first["id"] != second["id"]
    listed = admin.get(f"/admin/v1/accounts/{account_id}/keys").get_json()["data"]
    assert [item["id"] for item in listed] == [first["id"], second["id"]]


def test_the_stored_row_holds_only_the_hash(
    admin: FlaskClient, db: Session, runtime: Runtime
) -> None:
    created = new_key(admin, new_account(admin))
    secret = created["key"]
    found = keys.find_key(db, secret, hmac_key=runtime.settings.hmac_key)
    assert found.id == created["id"]

    row = (
        db.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": created["id"]})
        .mappings()
        .one()
    )
    for column, value in row.items():
        assert secret not in str(value), column
        assert secret[3:] not in str(value), column
    # A different server secret does not find it: what is stored is keyed.
    with pytest.raises(keys.InvalidApiKey):
        keys.find_key(db, secret, hmac_key=runtime.settings.hmac_key + b"-other")


# --- states follow the balance -------------------------------------------------------------------


def test_a_key_follows_the_balance_between_402_and_active(admin: FlaskClient, db: Session) -> None:
    account_id = new_account(admin)
    created = new_key(admin, account_id)
    assert (created["state"], created["http_status"]) == ("insufficient_balance", 402)

    adjust(admin, account_id, "5.25")
    after_credit = get_key(admin, created["id"])
    assert (after_credit["state"], after_credit["http_status"]) == ("active", 200)

    adjust(admin, account_id, "-5.25")  # back to exactly zero
    balance = admin.get(f"/admin/v1/accounts/{account_id}").get_json()["available_usd"]
    assert Decimal(balance) == 0
    after_debit = get_key(admin, created["id"])
    assert (after_debit["state"], after_debit["http_status"]) == ("insufficient_balance", 402)

    changes = state_changes(db, created["id"])
    assert [(old, new) for old, new, _ in changes] == [
        (None, "insufficient_balance"),
        ("insufficient_balance", "active"),
        ("active", "insufficient_balance"),
    ]
    assert all(reason.strip() for _, _, reason in changes)
    assert "credit" in changes[1][2]
    assert "debit" in changes[2][2]


def test_a_credit_that_does_not_change_the_state_records_no_change(
    admin: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin)
    created = new_key(admin, account_id)
    adjust(admin, account_id, "1")
    adjust(admin, account_id, "1")  # still active: nothing to record
    assert len(state_changes(db, created["id"])) == 2


def test_a_key_on_a_funded_account_starts_active(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    adjust(admin, account_id, "0.000000001")
    created = new_key(admin, account_id)
    assert (created["state"], created["http_status"]) == ("active", 200)


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


# --- revoke and rotate ---------------------------------------------------------------------------


def test_revoke_is_final(admin: FlaskClient, db: Session) -> None:
    account_id = new_account(admin)
    adjust(admin, account_id, "3")
    created = new_key(admin, account_id)

    revoked = admin.post(f"/admin/v1/keys/{created['id']}/revoke")
    assert revoked.status_code == 200
    assert (revoked.get_json()["state"], revoked.get_json()["http_status"]) == ("revoked", 401)
    assert "key" not in revoked.get_json()
    again = admin.post(f"/admin/v1/keys/{created['id']}/revoke")
    assert again.status_code == 200
    assert again.get_json()["state"] == "revoked"

    assert_error(patch(admin, created["id"], name="resurrected"), 400, "invalid_request")
    assert_error(patch(admin, created["id"], disabled=False), 400, "invalid_request")
    assert_error(admin.post(f"/admin/v1/keys/{created['id']}/rotate"), 400, "invalid_request")
    adjust(admin, account_id, "3")  # money does not bring it back either

    final = get_key(admin, created["id"])
    assert (final["state"], final["http_status"], final["name"]) == (
        "revoked",
        401,
        created["name"],
    )
    assert [(old, new) for old, new, _ in state_changes(db, created["id"])] == [
        (None, "active"),
        ("active", "revoked"),
    ]


def test_rotate_replaces_the_secret(admin: FlaskClient, db: Session, runtime: Runtime) -> None:
    hmac_key = runtime.settings.hmac_key
    created = new_key(admin, new_account(admin))
    old_secret = created["key"]

    rotated = admin.post(f"/admin/v1/keys/{created['id']}/rotate")
    assert rotated.status_code == 200, rotated.get_json()
    body = rotated.get_json()
    new_secret = body["key"]
    assert KEY_FORMAT.fullmatch(new_secret)
    assert new_secret != old_secret
    assert body["id"] == created["id"]
    assert body["state"] == created["state"]
    assert body["masked_key"].endswith(new_secret[-4:])

    with pytest.raises(keys.InvalidApiKey):
        keys.find_key(db, old_secret, hmac_key=hmac_key)
    assert keys.find_key(db, new_secret, hmac_key=hmac_key).id == created["id"]

    fetched = admin.get(f"/admin/v1/keys/{created['id']}")
    assert new_secret not in fetched.get_data(as_text=True)
    assert "key" not in fetched.get_json()


# --- expiry --------------------------------------------------------------------------------------


def test_a_key_past_its_expiry_is_expired_and_401(admin: FlaskClient, db: Session) -> None:
    account_id = new_account(admin)
    adjust(admin, account_id, "1")
    created = new_key(
        admin, account_id, expires_at=iso(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    )
    assert get_key(admin, created["id"])["state"] == "active"

    db.execute(
        update(ApiKey)
        .where(ApiKey.id == created["id"])
        .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    )
    fetched = get_key(admin, created["id"])
    assert (fetched["state"], fetched["http_status"]) == ("expired", 401)
    listed = admin.get(f"/admin/v1/accounts/{account_id}/keys").get_json()["data"]
    assert [(item["id"], item["state"]) for item in listed] == [(created["id"], "expired")]


def test_an_expired_key_can_be_renamed_without_touching_its_expiry(
    admin: FlaskClient, db: Session
) -> None:
    account_id = new_account(admin)
    created = new_key(
        admin, account_id, expires_at=iso(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    )
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    db.execute(update(ApiKey).where(ApiKey.id == created["id"]).values(expires_at=past))

    renamed = patch(admin, created["id"], name="archived")
    assert renamed.status_code == 200, renamed.get_json()
    assert (renamed.get_json()["name"], renamed.get_json()["state"]) == ("archived", "expired")
    assert_error(
        patch(admin, created["id"], expires_at=iso(past - dt.timedelta(days=1))),
        400,
        "invalid_request",
        "expires_at",
    )
