"""Input that drew a 500 before (issue #10, observation 2) answers a 4xx naming the problem and
writes nothing: NUL characters in any text, cursors that are not ours, ids and numbers beyond
what the columns hold. Each example below is one the fuzzing (``test_fuzz.py``) or the issue
found; hypothesis looks for more of the same kind."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.access.audit import AuditEntry
from billing.api.schemas import MAX_CURSOR_LENGTH
from billing.catalog.usage import MAX_TOKENS
from tests.support import assert_error, new_key

# A test's fixtures (its rolled-back transaction) are shared by every example it draws, which
# is what is wanted here: each example must leave nothing behind.
FIXTURES_SHARED = settings(
    max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def account(admin: FlaskClient) -> dict[str, Any]:
    response = admin.post("/admin/v1/accounts", json={"name": "hostile"})
    assert response.status_code == 201
    body: dict[str, Any] = response.get_json()
    return body


def writes(db: Session) -> int:
    """Admin writes recorded so far (every admin write that succeeds is audited)."""
    return db.scalar(select(func.count()).select_from(AuditEntry)) or 0


# --- NUL in request bodies --------------------------------------------------------------------


def admin_requests(account: dict[str, Any], key_id: str) -> list[tuple[str, str, Any, str]]:
    """(method, path, body, the field at fault) for each admin body field found to 500."""
    return [
        ("POST", "/admin/v1/accounts", {"name": "acme\x00"}, "name"),
        ("POST", "/admin/v1/accounts", {"name": "acme", "email": "a\x00@acme.test"}, "email"),
        ("POST", f"/admin/v1/accounts/{account['id']}/keys", {"name": "k\x00"}, "name"),
        (
            "POST",
            f"/admin/v1/accounts/{account['id']}/keys",
            {"name": "k", "allowed_models": ["doubao-seed-2-0-lite", "x\x00"]},
            "allowed_models[1]",
        ),
        ("PATCH", f"/admin/v1/keys/{key_id}", {"allowed_models": ["\x00"]}, "allowed_models[0]"),
        ("PATCH", f"/admin/v1/keys/{key_id}", {"rate_limit": "1 per\x00 second"}, "rate_limit"),
        (
            "POST",
            f"/admin/v1/accounts/{account['id']}/adjustments",
            {"amount_usd": "1.00", "reason": "welcome\x00"},
            "reason",
        ),
        ("POST", "/admin/v1/gateway-tokens", {"name": "gw\x00"}, "name"),
        ("POST", "/admin/v1/models/doubao-seed-2-0-lite/aliases", {"alias": "l\x00"}, "alias"),
        ("POST", "/admin/v1/webhook-endpoints", {"url": "https://gw.test/\x00"}, "url"),
        ("POST", "/admin/v1/accounts", {"name": "acme", "note\x00": 1}, "note\\u0000"),
    ]


def test_a_nul_in_any_admin_body_field_is_a_400_naming_it(
    admin: FlaskClient, account: dict[str, Any], db: Session
) -> None:
    key = new_key(admin, account["id"])
    before = writes(db)
    for method, path, body, param in admin_requests(account, key["id"]):
        response = admin.open(path, method=method, json=body, headers={"Idempotency-Key": "n"})
        error = assert_error(response, 400, "invalid_request", param)
        assert "NUL" in error["message"], (path, body)
    assert writes(db) == before


def test_a_nul_in_an_idempotency_key_is_refused(
    admin: FlaskClient, account: dict[str, Any]
) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{account['id']}/adjustments",
        json={"amount_usd": "1.00", "reason": "r"},
        headers={"Idempotency-Key": "k\x00"},
    )
    assert_error(response, 400, "invalid_request", "Idempotency-Key")


@FIXTURES_SHARED
@given(name=st.text(max_size=50).map(lambda text: text + "\x00"))
@example(name="acme\x00")
@example(name="\x00")
def test_an_account_name_holding_a_nul_is_refused_whatever_else_it_holds(
    admin: FlaskClient, db: Session, name: str
) -> None:
    before = writes(db)
    assert_error(admin.post("/admin/v1/accounts", json={"name": name}), 400, "invalid_request")
    assert writes(db) == before


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"request_id": "r\x00"}, "request_id"),
        ({"category": "violence\x00"}, "category"),
        ({"detail": "said \x00"}, "detail"),
    ],
)
def test_a_nul_in_a_violation_report_is_a_400_naming_the_field(
    admin: FlaskClient, gateway: FlaskClient, account: dict[str, Any], fields: Any, param: str
) -> None:
    key = new_key(admin, account["id"])
    body = {"request_id": "r", "key_id": key["id"], "category": "violence"} | fields
    assert_error(gateway.post("/gateway/v1/violations", json=body), 400, "invalid_request", param)
    assert admin.get(f"/admin/v1/keys/{key['id']}/violations").get_json()["data"] == []


def test_a_nul_in_the_authorize_model_is_a_400_naming_it(
    admin: FlaskClient, gateway: FlaskClient, account: dict[str, Any]
) -> None:
    key = new_key(admin, account["id"])
    body = {"api_key": key["key"], "model": "doubao-seed-2-0-lite\x00", "request_id": "r1"}
    assert_error(gateway.post("/gateway/v1/authorize", json=body), 400, "invalid_request", "model")


# --- cursors ----------------------------------------------------------------------------------


def listings(account: dict[str, Any], key_id: str, endpoint_id: str) -> list[str]:
    return [
        "/admin/v1/accounts",
        f"/admin/v1/accounts/{account['id']}/ledger",
        "/admin/v1/audit-log",
        f"/admin/v1/webhook-endpoints/{endpoint_id}/deliveries",
        f"/admin/v1/keys/{key_id}/violations",
        "/gateway/v1/key-states",
    ]


@FIXTURES_SHARED
@given(cursor=st.text(min_size=1, max_size=MAX_CURSOR_LENGTH + 10))
@example(cursor="AAAA")  # base64 of three NULs
@example(cursor="w4fDhg")  # base64 of non-ASCII UTF-8
@example(cursor="/w")  # base64 of a byte that is not UTF-8
@example(cursor="ß")
@example(cursor="MTAwMDAwMDAwMDAwMDAwMDAwMDAw")  # a row number beyond BIGINT
@example(cursor="A" * (MAX_CURSOR_LENGTH + 1))
def test_a_cursor_we_did_not_return_is_a_400_naming_it_on_every_list(
    admin: FlaskClient, gateway: FlaskClient, account: dict[str, Any], cursor: str
) -> None:
    key = new_key(admin, account["id"])
    endpoint = admin.post(
        "/admin/v1/webhook-endpoints", json={"url": "https://gw.example.com/hooks"}
    ).get_json()
    for path in listings(account, key["id"], endpoint["id"]):
        client = gateway if path.startswith("/gateway/") else admin
        response = client.get(path, query_string={"cursor": cursor})
        if response.status_code == 200:  # a cursor that is one of ours, by chance ("MQ" is 1)
            continue
        body = response.get_json()
        assert response.status_code == 400, (path, cursor, body)
        assert body["error"]["param"] == "cursor", (path, cursor, body)


def test_next_cursors_still_page_through_a_list(admin: FlaskClient) -> None:
    made = {
        admin.post("/admin/v1/accounts", json={"name": f"p{i}"}).get_json()["id"] for i in range(3)
    }
    seen: list[str] = []
    cursor = None
    while True:
        page = admin.get(
            "/admin/v1/accounts",
            query_string={"limit": 2, **({"cursor": cursor} if cursor else {})},
        ).get_json()
        seen += [item["id"] for item in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert made <= set(seen)
    assert len(seen) == len(set(seen))


# --- ids and numbers beyond the columns -------------------------------------------------------


@pytest.mark.parametrize("delivery_id", ["99999999999999999999", "9223372036854775808", "0", "-1"])
def test_a_delivery_id_no_row_can_have_is_a_404(admin: FlaskClient, delivery_id: str) -> None:
    assert_error(admin.get(f"/admin/v1/webhook-deliveries/{delivery_id}"), 404, "not_found")
    replay = admin.post(f"/admin/v1/webhook-deliveries/{delivery_id}/replay")
    assert_error(replay, 404, "not_found")


@pytest.mark.parametrize("tokens", [2**31, 2**63, MAX_TOKENS + 1])
def test_max_output_tokens_beyond_what_a_hold_may_cover_is_a_400(
    admin: FlaskClient, db: Session, tokens: int
) -> None:
    before = writes(db)
    response = admin.post(
        "/admin/v1/models",
        json={
            "id": "big-model",
            "input_price_per_m": "1",
            "output_price_per_m": "2",
            "max_output_tokens": tokens,
        },
    )
    assert_error(response, 400, "invalid_request", "max_output_tokens")
    assert writes(db) == before


def test_max_output_tokens_at_the_limit_is_accepted(admin: FlaskClient) -> None:
    response = admin.post(
        "/admin/v1/models",
        json={
            "id": "big-model",
            "input_price_per_m": "1",
            "output_price_per_m": "2",
            "max_output_tokens": MAX_TOKENS,
        },
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["pricing"]["max_output_tokens"] == MAX_TOKENS
