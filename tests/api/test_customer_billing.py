"""The OpenAI-compatible billing endpoints chat clients call with the customer's own key:
``GET /v1/dashboard/billing/subscription`` and ``GET /v1/dashboard/billing/usage``."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.accounts.rollups import month_start
from billing.catalog import catalog
from billing.payments.models import AutoRecharge
from tests.support import assert_error, new_key, report_usage

SEED = {
    model["id"]: model for model in json.loads(catalog.default_price_file().read_text())["models"]
}
LITE, CODE = "doubao-seed-2-0-lite", "doubao-seed-2-0-code"
# Seed 002's Responses API usage: 88 input, 230 output of which 211 reasoning.
SEED_002 = {
    "input_tokens": 88,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 230,
    "output_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}
SUBSCRIPTION = "/v1/dashboard/billing/subscription"
USAGE = "/v1/dashboard/billing/usage"


def cost_nanos(model: str, input_tokens: int, output_tokens: int) -> int:
    """The seed price of a call (no cached or reasoning prices: they fall back), rounded once."""
    price = SEED[model]
    exact = input_tokens * Decimal(price["input_price_per_m"]) + output_tokens * Decimal(
        price["output_price_per_m"]
    )
    return int((exact * 1000 + Decimal("0.5")).to_integral_value(rounding="ROUND_FLOOR"))


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def funded_key(admin: FlaskClient, amount_usd: str = "10.00") -> dict[str, Any]:
    account = admin.post("/admin/v1/accounts", json={"name": "Acme Inc"}).get_json()
    key = new_key(admin, account["id"])
    response = admin.post(
        f"/admin/v1/accounts/{account['id']}/adjustments",
        json={"amount_usd": amount_usd, "reason": "welcome credit"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.get_json()
    return key


def balance_nanos(admin: FlaskClient, account_id: str) -> int:
    balance = admin.get(f"/admin/v1/accounts/{account_id}").get_json()["balance_usd"]
    return int(Decimal(balance) * 10**9)


@pytest.fixture
def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_usage_lists_every_day_with_a_line_item_per_model_in_cents(
    admin: FlaskClient, gateway: FlaskClient, client: FlaskClient, now: dt.datetime
) -> None:
    key = funded_key(admin)
    today = now.date()
    report_usage(gateway, key, CODE, now, SEED_002)
    report_usage(gateway, key, CODE, now, SEED_002)
    report_usage(
        gateway,
        key,
        LITE,
        now - dt.timedelta(days=2),
        {"prompt_tokens": 1000, "completion_tokens": 500},
    )
    report_usage(
        gateway, key, LITE, now - dt.timedelta(days=20), SEED_002
    )  # outside the range asked for
    code_cost = cost_nanos(CODE, 88, 230)
    lite_cost = cost_nanos(LITE, 1000, 500)
    assert code_cost == 1_738_820  # 88 x $1.49/M + 230 x $6.99/M

    start, end = today - dt.timedelta(days=2), today + dt.timedelta(days=1)
    response = client.get(f"{USAGE}?start_date={start}&end_date={end}", headers=bearer(key["key"]))

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["object"] == "list"
    total_nanos = 2 * code_cost + lite_cost
    assert body["total_usage"] == float(Decimal(total_nanos) / 10**7)
    assert [day["timestamp"] for day in body["daily_costs"]] == [
        dt.datetime.combine(start + dt.timedelta(days=n), dt.time(), dt.UTC).timestamp()
        for n in range(3)
    ]
    items = [day["line_items"] for day in body["daily_costs"]]
    assert items == [
        [{"name": LITE, "cost": float(Decimal(lite_cost) / 10**7)}],
        [],
        [{"name": CODE, "cost": float(Decimal(2 * code_cost) / 10**7)}],
    ]
    # The numbers are JSON numbers, as the chat clients divide total_usage by 100.
    assert isinstance(body["total_usage"], float)


def test_the_limit_minus_this_months_usage_is_the_balance(
    admin: FlaskClient, gateway: FlaskClient, client: FlaskClient, now: dt.datetime
) -> None:
    key = funded_key(admin, "20.00")
    report_usage(gateway, key, CODE, now, SEED_002)
    report_usage(gateway, key, LITE, now, {"prompt_tokens": 123_456, "completion_tokens": 7_890})
    # Last month's usage lowered the balance but is not part of this month's usage.
    report_usage(
        gateway,
        key,
        LITE,
        dt.datetime.combine(month_start(now), dt.time(), dt.UTC) - dt.timedelta(days=3),
        SEED_002,
    )
    balance = balance_nanos(admin, key["account_id"])
    month_usage = cost_nanos(CODE, 88, 230) + cost_nanos(LITE, 123_456, 7_890)

    subscription = client.get(SUBSCRIPTION, headers=bearer(key["key"]))
    # NextChat's request: from the 1st of the month to tomorrow.
    tomorrow = now.date() + dt.timedelta(days=1)
    usage = client.get(
        f"{USAGE}?start_date={month_start(now)}&end_date={tomorrow}", headers=bearer(key["key"])
    )

    assert subscription.status_code == 200, subscription.get_json()
    body = subscription.get_json()
    assert body["object"] == "billing_subscription"
    expected = float(Decimal(balance + month_usage) / 10**9)
    assert body["hard_limit_usd"] == body["soft_limit_usd"] == body["system_hard_limit_usd"]
    assert body["hard_limit_usd"] == expected
    assert body["has_payment_method"] is False
    assert body["access_until"] == 0
    assert body["plan"] == {"id": "prepaid", "title": "Prepaid"}
    assert body["account_name"] == "Acme Inc"
    total_usage_cents = usage.get_json()["total_usage"]
    assert total_usage_cents == float(Decimal(month_usage) / 10**7)
    remaining = Decimal(str(body["hard_limit_usd"])) - Decimal(str(total_usage_cents)) / 100
    assert remaining == Decimal(balance) / 10**9


def test_a_key_at_402_reads_its_empty_account(admin: FlaskClient, client: FlaskClient) -> None:
    account = admin.post("/admin/v1/accounts", json={"name": "empty"}).get_json()
    expires = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    key = new_key(admin, account["id"], expires_at=expires.isoformat())
    assert key["http_status"] == 402

    subscription = client.get(SUBSCRIPTION, headers=bearer(key["key"])).get_json()
    usage = client.get(
        f"{USAGE}?start_date=2026-01-01&end_date=2026-01-03", headers=bearer(key["key"])
    ).get_json()

    assert subscription["hard_limit_usd"] == 0
    assert subscription["access_until"] == int(expires.timestamp())
    assert usage == {
        "object": "list",
        "total_usage": 0,
        "daily_costs": [
            {"timestamp": 1767225600.0, "line_items": []},
            {"timestamp": 1767312000.0, "line_items": []},
        ],
    }


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("end_date=2026-01-02", "start_date"),
        ("start_date=2026-01-02", "end_date"),
        ("start_date=yesterday&end_date=2026-01-02", "start_date"),
        ("start_date=2026-02-30&end_date=2026-03-02", "start_date"),
        ("start_date=2026-01-01&end_date=1767225600", "end_date"),
        ("start_date=2026-01-05&end_date=2026-01-04", "end_date"),
        ("start_date=2026-01-01&end_date=2026-04-12", "end_date"),  # 101 days
    ],
)
def test_bad_dates_are_refused_naming_the_parameter(
    admin: FlaskClient, client: FlaskClient, query: str, param: str
) -> None:
    key = funded_key(admin)
    response = client.get(f"{USAGE}?{query}", headers=bearer(key["key"]))
    error = assert_error(response, 400, response.get_json()["error"]["code"], param=param)
    assert param in error["message"]


def test_a_hundred_days_is_the_longest_range(admin: FlaskClient, client: FlaskClient) -> None:
    key = funded_key(admin)
    response = client.get(
        f"{USAGE}?start_date=2026-01-01&end_date=2026-04-11", headers=bearer(key["key"])
    )
    assert response.status_code == 200
    assert len(response.get_json()["daily_costs"]) == 100
    # Unpadded months and days, as some clients build them, are read too.
    unpadded = client.get(
        f"{USAGE}?start_date=2026-1-1&end_date=2026-2-1", headers=bearer(key["key"])
    )
    assert len(unpadded.get_json()["daily_costs"]) == 31


@pytest.mark.parametrize(
    "path", [SUBSCRIPTION, f"{USAGE}?start_date=2026-01-01&end_date=2026-01-02"]
)
def test_a_missing_unknown_or_revoked_key_is_refused(
    admin: FlaskClient, client: FlaskClient, path: str
) -> None:
    key = funded_key(admin)
    assert admin.post(f"/admin/v1/keys/{key['id']}/revoke").status_code == 200
    assert_error(client.get(path), 401, "invalid_api_key")
    assert_error(client.get(path, headers=bearer("sk-" + "x" * 48)), 401, "invalid_api_key")
    assert_error(client.get(path, headers=bearer(key["key"])), 401, "invalid_api_key")


def test_both_endpoints_are_in_the_openapi_document(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    subscription = document["paths"][SUBSCRIPTION]["get"]
    usage = document["paths"][USAGE]["get"]
    assert subscription["security"] == usage["security"] == [{"customer": []}]
    assert {parameter["name"] for parameter in usage["parameters"]} == {"start_date", "end_date"}
    schemas = document["components"]["schemas"]
    assert schemas["BillingSubscriptionOut"]["properties"]["hard_limit_usd"]["type"] == "number"
    assert schemas["BillingUsageOut"]["properties"]["total_usage"]["type"] == "number"


def test_a_saved_card_is_reported_as_a_payment_method(
    admin: FlaskClient, client: FlaskClient, db: Session
) -> None:
    key = funded_key(admin)
    before = client.get(SUBSCRIPTION, headers=bearer(key["key"])).get_json()
    db.add(
        AutoRecharge(
            account_id=key["account_id"],
            enabled=True,
            threshold_nanos=5 * 10**9,
            amount_nanos=20 * 10**9,
            daily_cap_nanos=100 * 10**9,
            payment_method_id="pm_card_visa",
            consecutive_failures=0,
            updated_at=dt.datetime.now(dt.UTC),
        )
    )
    db.flush()

    after = client.get(SUBSCRIPTION, headers=bearer(key["key"])).get_json()

    assert before["has_payment_method"] is False
    assert after["has_payment_method"] is True
