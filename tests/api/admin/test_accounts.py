"""Accounts over the admin API: create, get, list with cursor pagination, validation."""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.support import assert_error

USD = re.compile(r"-?[0-9]+\.[0-9]{9}")
MONEY_FIELDS = ("balance_usd", "held_usd", "available_usd")


def create(admin: FlaskClient, **fields: Any) -> dict[str, Any]:
    response = admin.post("/admin/v1/accounts", json=fields)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def walk(admin: FlaskClient, url: str, limit: int) -> list[list[dict[str, Any]]]:
    """Every page of a list, following next_cursor until it is null."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        query: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            query["cursor"] = cursor
        response = admin.get(url, query_string=query)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert body["object"] == "list"
        pages.append(body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 1000, "the cursor never ends"


def test_create_then_get_an_account(admin: FlaskClient) -> None:
    created = create(admin, name="Acme Ltd", email="billing@acme.test")
    assert created["object"] == "account"
    assert created["name"] == "Acme Ltd"
    assert created["email"] == "billing@acme.test"
    assert created["id"].startswith("acct_")
    for field in MONEY_FIELDS:
        assert isinstance(created[field], str)
        assert USD.fullmatch(created[field]), created[field]
        assert Decimal(created[field]) == 0

    fetched = admin.get(f"/admin/v1/accounts/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.get_json() == created


def test_email_is_optional(admin: FlaskClient) -> None:
    assert create(admin, name="No email")["email"] is None


def test_balance_fields_are_exact_decimal_strings_after_a_credit(admin: FlaskClient) -> None:
    account = create(admin, name="Funded")
    amount = "12.345678901"
    credited = admin.post(
        f"/admin/v1/accounts/{account['id']}/adjustments",
        json={"amount_usd": amount, "reason": "welcome credit"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert credited.status_code == 201, credited.get_json()
    body = admin.get(f"/admin/v1/accounts/{account['id']}").get_json()
    for field in MONEY_FIELDS:
        assert isinstance(body[field], str)
        assert USD.fullmatch(body[field]), body[field]
    assert Decimal(body["balance_usd"]) == Decimal(amount)
    assert Decimal(body["held_usd"]) == 0
    assert Decimal(body["available_usd"]) == Decimal(body["balance_usd"]) - Decimal(
        body["held_usd"]
    )


def test_list_walks_every_account_once_in_creation_order(admin: FlaskClient) -> None:
    mine = [create(admin, name=f"paged {i}")["id"] for i in range(5)]

    pages = walk(admin, "/admin/v1/accounts", limit=2)
    listed = [item["id"] for page in pages for item in page]
    assert all(len(page) == 2 for page in pages[:-1])
    assert 1 <= len(pages[-1]) <= 2
    assert len(listed) == len(set(listed))  # no account twice
    assert [account_id for account_id in listed if account_id in mine] == mine
    assert len(pages) >= 3  # 5 accounts at 2 a page


def test_creation_order_holds_across_a_full_cycle_of_the_id_clock(admin: FlaskClient) -> None:
    # Ids begin with the creation millisecond in base62; its last digit runs through all 62
    # values every 62 ms. Creating accounts for longer than that crosses every digit boundary
    # (9->A, Z->a, z->0), where a mis-ordered alphabet would list a newer account first.
    mine: list[str] = []
    started = time.monotonic()
    while len(mine) < 5 or time.monotonic() - started < 0.1:
        mine.append(create(admin, name=f"clock {len(mine)}")["id"])
        assert len(mine) < 10_000

    listed = [item for page in walk(admin, "/admin/v1/accounts", limit=100) for item in page]
    ordered = [item for item in listed if item["id"] in mine]
    assert [item["id"] for item in ordered] == mine
    created = [parse_time(item["created_at"]) for item in ordered]
    assert created == sorted(created)


def test_list_items_match_get(admin: FlaskClient) -> None:
    account = create(admin, name="listed")
    listed = [
        item
        for page in walk(admin, "/admin/v1/accounts", limit=100)
        for item in page
        if item["id"] == account["id"]
    ]
    assert listed == [account]


@pytest.mark.parametrize("limit", [0, 101, "many"])
def test_list_refuses_a_bad_limit(admin: FlaskClient, limit: Any) -> None:
    assert_error(
        admin.get("/admin/v1/accounts", query_string={"limit": limit}),
        400,
        "invalid_request",
        "limit",
    )


def test_unknown_account_is_an_openai_shaped_404(admin: FlaskClient) -> None:
    missing = "acct_doesnotexist"
    for response in (
        admin.get(f"/admin/v1/accounts/{missing}"),
        admin.get(f"/admin/v1/accounts/{missing}/keys"),
        admin.get(f"/admin/v1/accounts/{missing}/ledger"),
        admin.post(f"/admin/v1/accounts/{missing}/keys", json={"name": "k"}),
        admin.post(
            f"/admin/v1/accounts/{missing}/adjustments",
            json={"amount_usd": "1", "reason": "r"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        ),
    ):
        error = assert_error(response, 404, "not_found", "account_id")
        assert missing in error["message"]


def test_missing_name_is_refused_naming_it(admin: FlaskClient) -> None:
    error = assert_error(
        admin.post("/admin/v1/accounts", json={"email": "a@b.test"}), 400, "invalid_request", "name"
    )
    assert "required" in error["message"]


def test_an_unknown_field_is_refused_naming_it(admin: FlaskClient) -> None:
    response = admin.post("/admin/v1/accounts", json={"name": "x", "nickname": "y"})
    assert_error(response, 400, "invalid_request", "nickname")


@pytest.mark.parametrize("name", ["", 42, None, "n" * 201])
def test_a_bad_name_is_refused(admin: FlaskClient, name: Any) -> None:
    assert_error(
        admin.post("/admin/v1/accounts", json={"name": name}), 400, "invalid_request", "name"
    )


def test_refused_creations_create_nothing(admin: FlaskClient) -> None:
    before = [item["id"] for page in walk(admin, "/admin/v1/accounts", limit=100) for item in page]
    admin.post("/admin/v1/accounts", json={})
    admin.post("/admin/v1/accounts", json={"name": "x", "nickname": "y"})
    after = [item["id"] for page in walk(admin, "/admin/v1/accounts", limit=100) for item in page]
    assert after == before
