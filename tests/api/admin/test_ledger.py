"""Adjustments and the ledger: exact movements, idempotency, validation, audit, append-only."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from billing.access.audit import AuditEntry
from billing.access.auth import Role, create_token
from billing.core.db import utcnow
from billing.core.money import MAX_AMOUNT_NANOS, format_usd
from billing.ledger import ledger
from billing.runtime import Runtime
from tests.support import assert_error

NANOS_PER_USD = Decimal(10) ** 9


def new_account(admin: FlaskClient, name: str = "ledger owner") -> str:
    response = admin.post("/admin/v1/accounts", json={"name": name})
    assert response.status_code == 201
    return response.get_json()["id"]


def post_adjustment(
    admin: FlaskClient,
    account_id: str,
    body: Any,
    idempotency_key: str | None = None,
    **kwargs: Any,
) -> Any:
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    return admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments", json=body, headers=headers, **kwargs
    )


def balance(admin: FlaskClient, account_id: str) -> Decimal:
    body = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    assert isinstance(body["balance_usd"], str)
    return Decimal(body["balance_usd"])


def ledger_ids(admin: FlaskClient, account_id: str) -> list[int]:
    body = admin.get(
        f"/admin/v1/accounts/{account_id}/ledger", query_string={"limit": 100}
    ).get_json()
    return [entry["id"] for entry in body["data"]]


def nanos(amount: str) -> int:
    return int(Decimal(amount) * NANOS_PER_USD)


# --- the Idempotency-Key -------------------------------------------------------------------------


def test_idempotency_key_is_required(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments", json={"amount_usd": "1", "reason": "r"}
    )
    assert_error(response, 400, "invalid_request", "Idempotency-Key")
    assert balance(admin, account_id) == 0
    assert ledger_ids(admin, account_id) == []


def test_an_empty_idempotency_key_is_refused(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": "1", "reason": "r"},
        headers={"Idempotency-Key": ""},
    )
    assert_error(response, 400, "invalid_request", "Idempotency-Key")
    assert balance(admin, account_id) == 0


def test_a_retry_with_the_same_key_and_body_answers_the_first_entry(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    body = {"amount_usd": "7.5", "reason": "goodwill"}
    first = post_adjustment(admin, account_id, body, "retry-me")
    assert first.status_code == 201
    for _ in range(2):
        retry = post_adjustment(admin, account_id, body, "retry-me")
        assert retry.status_code == 200
        assert retry.get_json() == first.get_json()
    assert balance(admin, account_id) == Decimal("7.5")
    assert ledger_ids(admin, account_id) == [first.get_json()["id"]]


@pytest.mark.parametrize(
    "changed",
    [
        {"amount_usd": "7.500000001", "reason": "goodwill"},
        {"amount_usd": "7.5", "reason": "another reason"},
    ],
)
def test_the_same_key_with_a_different_body_is_a_conflict(
    admin: FlaskClient, changed: dict[str, str]
) -> None:
    account_id = new_account(admin)
    first = post_adjustment(
        admin, account_id, {"amount_usd": "7.5", "reason": "goodwill"}, "reused"
    )
    assert first.status_code == 201
    assert_error(
        post_adjustment(admin, account_id, changed, "reused"), 409, "idempotency_key_reused"
    )
    assert balance(admin, account_id) == Decimal("7.5")
    assert ledger_ids(admin, account_id) == [first.get_json()["id"]]


# --- exact movements -----------------------------------------------------------------------------


def test_credits_and_debits_move_the_balance_exactly(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    amounts = [
        "10",
        "-3.333333333",
        "0.000000001",
        "-0.000000001",
        "123456.789012345",
        "-6.666666667",
    ]
    expected = Decimal(0)
    for amount in amounts:
        response = post_adjustment(
            admin, account_id, {"amount_usd": amount, "reason": f"move {amount}"}
        )
        assert response.status_code == 201, response.get_json()
        entry = response.get_json()
        assert entry["object"] == "ledger_entry"
        assert entry["kind"] == "adjustment"
        assert entry["account_id"] == account_id
        assert entry["reason"] == f"move {amount}"
        assert isinstance(entry["amount_usd"], str)
        assert Decimal(entry["amount_usd"]) == Decimal(amount)
        expected += Decimal(amount)
        assert balance(admin, account_id) == expected
    account = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    assert Decimal(account["available_usd"]) == expected


def test_a_debit_may_take_the_balance_below_zero_exactly(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    assert (
        post_adjustment(
            admin, account_id, {"amount_usd": "-0.5", "reason": "chargeback"}
        ).status_code
        == 201
    )
    assert balance(admin, account_id) == Decimal("-0.5")


@pytest.mark.parametrize("amount", [1000, 1.5, -2, True])
def test_amount_as_a_json_number_is_refused(admin: FlaskClient, amount: Any) -> None:
    account_id = new_account(admin)
    error = assert_error(
        post_adjustment(admin, account_id, {"amount_usd": amount, "reason": "r"}),
        400,
        "invalid_request",
        "amount_usd",
    )
    if not isinstance(amount, bool):
        assert "string" in error["message"]
    assert balance(admin, account_id) == 0


@pytest.mark.parametrize(
    "amount",
    [
        "1e3",
        "1_000",
        "0.0000000001",
        "",
        "abc",
        "0",
        "-0",
        "0.000000000",
        " 1",
        "1.",
        ".5",
        "+1",
        "NaN",
        "١٢",
        None,
    ],
)
def test_a_malformed_amount_is_refused_and_moves_nothing(admin: FlaskClient, amount: Any) -> None:
    account_id = new_account(admin)
    post_adjustment(admin, account_id, {"amount_usd": "2", "reason": "start"})
    response = post_adjustment(admin, account_id, {"amount_usd": amount, "reason": "r"})
    assert_error(response, 400, "invalid_request", "amount_usd")
    assert balance(admin, account_id) == 2
    assert len(ledger_ids(admin, account_id)) == 1


@pytest.mark.parametrize("amount", ["100000000000", "-100000000000", "99999999999999999999999"])
def test_an_amount_beyond_what_can_be_stored_is_refused(admin: FlaskClient, amount: str) -> None:
    account_id = new_account(admin)
    assert_error(
        post_adjustment(admin, account_id, {"amount_usd": amount, "reason": "r"}),
        400,
        "invalid_request",
        "amount_usd",
    )
    assert balance(admin, account_id) == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"amount_usd": "1"}, "reason"),
        ({"amount_usd": "1", "reason": " "}, "reason"),
        ({"reason": "r"}, "amount_usd"),
        ({"amount_usd": "1", "reason": "r", "currency": "EUR"}, "currency"),
    ],
)
def test_reason_and_amount_are_required_and_nothing_else_is_taken(
    admin: FlaskClient, body: dict[str, str], param: str
) -> None:
    account_id = new_account(admin)
    assert_error(post_adjustment(admin, account_id, body), 400, "invalid_request", param)
    assert balance(admin, account_id) == 0


# --- the ledger list -----------------------------------------------------------------------------


def test_the_ledger_lists_newest_first_and_paginates(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    other = new_account(admin, "someone else")
    post_adjustment(admin, other, {"amount_usd": "99", "reason": "not mine"})
    amounts = ["1", "-0.25", "3.000000007", "-1.5", "0.1"]
    created = []
    for amount in amounts:
        response = post_adjustment(admin, account_id, {"amount_usd": amount, "reason": "page me"})
        created.append(response.get_json())

    pages = []
    cursor = None
    while True:
        query: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = admin.get(f"/admin/v1/accounts/{account_id}/ledger", query_string=query).get_json()
        pages.append(body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10
    assert [len(page) for page in pages[:-1]] == [2] * (len(pages) - 1)
    listed = [entry for page in pages for entry in page]
    assert listed == list(reversed(created))
    assert sum(Decimal(entry["amount_usd"]) for entry in listed) == balance(admin, account_id)


def test_a_bad_ledger_cursor_is_refused(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    response = admin.get(
        f"/admin/v1/accounts/{account_id}/ledger", query_string={"cursor": "not-ours"}
    )
    assert_error(response, 400, "invalid_cursor", "cursor")


# --- the audit log -------------------------------------------------------------------------------


def test_each_successful_write_is_audited_once_without_secrets(
    client: FlaskClient, db: Session, runtime: Runtime
) -> None:
    token, token_secret = create_token(
        db, role=Role.ADMIN, name="auditor", hmac_key=runtime.settings.hmac_key, now=utcnow()
    )
    headers = {"Authorization": f"Bearer {token_secret}"}
    newest_before = db.scalar(select(func.max(AuditEntry.id))) or 0

    account = client.post(
        "/admin/v1/accounts", json={"name": "audited"}, headers=headers
    ).get_json()
    key = client.post(
        f"/admin/v1/accounts/{account['id']}/keys", json={"name": "k"}, headers=headers
    ).get_json()
    credit = client.post(
        f"/admin/v1/accounts/{account['id']}/adjustments",
        json={"amount_usd": "4.2", "reason": "audited credit"},
        headers={**headers, "Idempotency-Key": "audit-1"},
    ).get_json()
    rotated = client.post(f"/admin/v1/keys/{key['id']}/rotate", headers=headers).get_json()
    # Failed writes leave no trace.
    failures = [
        client.post(
            f"/admin/v1/accounts/{account['id']}/adjustments",
            json={"amount_usd": "abc", "reason": "bad"},
            headers={**headers, "Idempotency-Key": "audit-2"},
        ),
        client.post(
            f"/admin/v1/accounts/{account['id']}/adjustments",
            json={"amount_usd": "5", "reason": "audited credit"},
            headers={**headers, "Idempotency-Key": "audit-1"},
        ),
        client.post(
            f"/admin/v1/accounts/{account['id']}/keys",
            json={"name": "k", "rate_limit": "lots"},
            headers=headers,
        ),
        client.post("/admin/v1/accounts", json={"name": "no auth"}),
        client.post(
            "/admin/v1/accounts",
            json={"name": "bad auth"},
            headers={"Authorization": "Bearer nope"},
        ),
        client.patch("/admin/v1/keys/key_missing", json={"name": "x"}, headers=headers),
    ]
    assert [response.status_code for response in failures] == [400, 409, 400, 401, 401, 404]

    log = client.get("/admin/v1/audit-log", query_string={"limit": 100}, headers=headers)
    assert log.status_code == 200
    mine = [entry for entry in log.get_json()["data"] if entry["id"] > newest_before]
    assert [(entry["action"], entry["target_id"], entry["status"]) for entry in reversed(mine)] == [
        ("POST /admin/v1/accounts", account["id"], 201),
        ("POST /admin/v1/accounts/<account_id>/keys", key["id"], 201),
        ("POST /admin/v1/accounts/<account_id>/adjustments", str(credit["id"]), 201),
        ("POST /admin/v1/keys/<key_id>/rotate", key["id"], 200),
    ]
    assert all(entry["actor"] == token.id for entry in mine)
    assert mine[-1]["request"] == {"name": "audited"}
    assert mine[-3]["request"] == {"amount_usd": "4.2", "reason": "audited credit"}

    # No secret anywhere: not in the API's view of the log, not in the table itself.
    rows = (
        db.execute(text("SELECT * FROM audit_log WHERE id > :id"), {"id": newest_before})
        .mappings()
        .all()
    )
    assert len(rows) == 4
    stored = json.dumps([dict(row) for row in rows], default=str)
    for secret in (token_secret, key["key"], rotated["key"]):
        assert secret not in log.get_data(as_text=True)
        assert secret not in stored


# --- the database defends the ledger itself ------------------------------------------------------


def test_the_database_refuses_update_and_delete_of_entries(admin: FlaskClient, db: Session) -> None:
    account_id = new_account(admin)
    entry = post_adjustment(admin, account_id, {"amount_usd": "1", "reason": "keep"}).get_json()
    for statement in (
        "UPDATE ledger_entries SET amount_nanos = amount_nanos * 2 WHERE id = :id",
        "UPDATE ledger_entries SET reason = 'rewritten' WHERE id = :id",
        "DELETE FROM ledger_entries WHERE id = :id",
    ):
        with pytest.raises(DBAPIError, match="append-only"), db.begin_nested():
            db.execute(text(statement), {"id": entry["id"]})
    listed = admin.get(f"/admin/v1/accounts/{account_id}/ledger").get_json()["data"]
    assert listed == [entry]


INSERT_ENTRY = text(
    "INSERT INTO ledger_entries (account_id, kind, amount_nanos, reason, actor, created_at)"
    " VALUES (:account_id, :kind, :amount, 'raw', 'test', now())"
)


@pytest.mark.parametrize(
    ("kind", "amount"),
    [
        ("usage", 5),
        ("refund", 1),
        ("dispute", 1),
        ("top_up", -5),
        ("dispute_won", -1),
        ("adjustment", 0),
        ("gift", 5),
    ],
)
def test_the_database_refuses_a_wrong_signed_entry(
    admin: FlaskClient, db: Session, kind: str, amount: int
) -> None:
    account_id = new_account(admin)
    # The same row with the sign its kind calls for is accepted (then undone), so the refusal
    # below is the sign's doing, not a malformed insert.
    allowed = {
        "usage": -1,
        "refund": -1,
        "dispute": -1,
        "top_up": 1,
        "dispute_won": 1,
        "adjustment": 1,
    }
    if kind in allowed:
        savepoint = db.begin_nested()
        db.execute(INSERT_ENTRY, {"account_id": account_id, "kind": kind, "amount": allowed[kind]})
        savepoint.rollback()
    with pytest.raises(IntegrityError, match="sign_matches_kind"), db.begin_nested():
        db.execute(INSERT_ENTRY, {"account_id": account_id, "kind": kind, "amount": amount})


# --- reconciliation ------------------------------------------------------------------------------


def test_reconcile_is_clean_after_adjustments_and_reports_tampering(
    admin: FlaskClient, db: Session
) -> None:
    first, second, untouched = new_account(admin), new_account(admin), new_account(admin)
    movements = {first: ["10", "-3.333333333", "0.000000001"], second: ["5", "-5", "0.5"]}
    for account_id, amounts in movements.items():
        for amount in amounts:
            assert (
                post_adjustment(
                    admin, account_id, {"amount_usd": amount, "reason": "r"}
                ).status_code
                == 201
            )
    assert ledger.reconcile(db) == []

    expected_first = sum(nanos(amount) for amount in movements[first])
    db.execute(
        text("UPDATE accounts SET balance_nanos = balance_nanos + 1 WHERE id = :id"), {"id": first}
    )
    db.execute(text("UPDATE accounts SET balance_nanos = 777 WHERE id = :id"), {"id": untouched})
    drifts = ledger.reconcile(db)
    assert sorted(drifts, key=lambda drift: drift.account_id) == sorted(
        [
            ledger.Drift(first, expected_first + 1, expected_first),
            ledger.Drift(untouched, 777, 0),
        ],
        key=lambda drift: drift.account_id,
    )
    assert all(drift.account_id != second for drift in drifts)


def test_idempotency_keys_are_scoped_to_the_account(admin: FlaskClient) -> None:
    first, second = new_account(admin, "first"), new_account(admin, "second")
    body = {"amount_usd": "4.00", "reason": "monthly credit"}
    assert post_adjustment(admin, first, body, "credit-2026-11").status_code == 201
    assert post_adjustment(admin, second, body, "credit-2026-11").status_code == 201
    assert (balance(admin, first), balance(admin, second)) == (Decimal(4), Decimal(4))


def test_a_balance_never_passes_the_limit(admin: FlaskClient) -> None:
    account_id = new_account(admin)
    limit = format_usd(MAX_AMOUNT_NANOS)
    assert (
        post_adjustment(admin, account_id, {"amount_usd": limit, "reason": "r"}).status_code == 201
    )
    assert_error(
        post_adjustment(admin, account_id, {"amount_usd": "0.000000001", "reason": "r"}),
        400,
        "invalid_request",
        "amount_usd",
    )
    assert balance(admin, account_id) == Decimal(limit)
    assert len(ledger_ids(admin, account_id)) == 1
