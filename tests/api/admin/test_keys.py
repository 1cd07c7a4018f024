"""API keys over the admin API: issue and show once, states following the balance, revoke,
rotate, expiry. Settings and PATCH are in test_key_settings.py."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from billing.accounts import keys
from billing.accounts.keys import ApiKey
from billing.runtime import Runtime
from tests.api.admin.support import adjust, get_key, iso, new_account, patch, state_changes
from tests.support import assert_error, new_key

KEY_FORMAT = re.compile(r"sk-[0-9A-Za-z]{40,}")


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
