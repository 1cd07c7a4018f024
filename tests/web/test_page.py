"""The customer page at /billing, in real headless Chromium against a real server."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import requests
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing.accounts.page_sessions import TOKEN
from billing.core.money import format_dollars
from billing.payments.models import Payment
from tests.localstripe import PUBLISHABLE_KEY
from tests.support import report_usage
from tests.web import support
from tests.web.conftest import ARTIFACTS, SIGN_IN_LIMIT, watch_csp
from tests.web.support import (
    CODE,
    LITE,
    SEED_002,
    assert_json_error,
    csrf_of,
    customer,
    sign_in,
)


def test_a_bad_key_shows_an_error_and_stays_signed_out(
    page: Page, live_server: str, admin_api: FlaskClient
) -> None:
    customer(admin_api)
    page.goto(f"{live_server}/billing")
    page.get_by_label("API key").fill("sk-" + "0" * 48)
    with page.expect_response(f"{live_server}/billing/sign-in") as answer:
        page.get_by_role("button", name="Sign in").click()

    assert answer.value.status == 401
    expect(page.get_by_role("alert")).to_have_text(re.compile("not valid"))
    expect(page.get_by_label("API key")).to_be_visible()
    expect(page.locator("#balance")).to_have_count(0)


def test_a_good_key_shows_amounts_keys_chart_and_ledger(
    page: Page, live_server: str, admin_api: FlaskClient, gateway_api: FlaskClient
) -> None:
    acme = customer(admin_api, credit_usd="10.00")
    second = admin_api.post(
        f"/admin/v1/accounts/{acme.account_id}/keys", json={"name": "old laptop"}
    ).get_json()
    assert admin_api.post(f"/admin/v1/keys/{second['id']}/revoke").status_code == 200
    now = dt.datetime.now(dt.UTC)
    report_usage(gateway_api, acme.key, CODE, now, SEED_002)
    report_usage(gateway_api, acme.key, CODE, now - dt.timedelta(days=3), SEED_002)
    lite = {"prompt_tokens": 1_000_000, "completion_tokens": 100_000}  # $0.39 + $0.199
    report_usage(gateway_api, acme.key, LITE, now - dt.timedelta(days=3), lite)
    report_usage(gateway_api, acme.key, LITE, now - dt.timedelta(days=33), lite)  # not charted
    account = admin_api.get(f"/admin/v1/accounts/{acme.account_id}").get_json()
    balance = int(Decimal(account["balance_usd"]) * 10**9)
    assert balance == 10 * 10**9 - 2 * 1_738_820 - 2 * 589_000_000

    sign_in(page, live_server, acme.secret)

    expect(page.get_by_role("heading", name="Acme Inc", level=1)).to_be_visible()
    expect(page.locator("#balance")).to_have_text(format_dollars(balance))  # $8.81852236
    expect(page.locator("#held")).to_have_text("$0.00")
    expect(page.locator("#available")).to_have_text(format_dollars(balance))
    rows = page.locator("#keys tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text(acme.key["masked_key"])
    expect(rows.nth(0)).to_contain_text("Active")
    expect(rows.nth(1)).to_contain_text(second["masked_key"])
    expect(rows.nth(1)).to_contain_text("Revoked")
    # No secret is ever shown again.
    assert acme.secret not in page.content()
    # The chart: one series per model used in the last 30 days, with a text alternative.
    chart = page.locator("#usage-chart svg.chart")
    expect(chart).to_have_attribute("role", "img")
    series = page.locator("#usage-chart svg.chart g.series")
    expect(series).to_have_count(2)
    assert [series.nth(i).get_attribute("data-model") for i in range(2)] == [CODE, LITE]
    expect(series.nth(0).locator("rect")).to_have_count(2)  # today and 3 days ago
    expect(series.nth(1).locator("rect")).to_have_count(1)
    # The legend's swatches take their series' colours (drawn, not styled inline: see the CSP).
    swatches = page.locator(".legend .swatch rect")
    assert [swatches.nth(i).get_attribute("fill") for i in range(2)] == [
        series.nth(i).get_attribute("fill") for i in range(2)
    ]
    page.get_by_text("Usage as a table").click()
    table = page.locator("#usage-table")
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table).to_contain_text(format_dollars(2 * 1_738_820 + 589_000_000))
    expect(table).to_contain_text("$0.00173882")
    # The ledger: the credit and the usage charges, newest first.
    ledger = page.locator("#ledger tbody tr")
    expect(ledger.first).to_have_attribute("data-kind", "usage")
    expect(page.locator("#ledger")).to_contain_text("welcome credit")
    expect(page.locator("#ledger")).to_contain_text("$10.00")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "account-page.png", full_page=True)


def test_an_empty_account_with_a_402_key_shows_zero_and_the_block(
    page: Page, live_server: str, admin_api: FlaskClient
) -> None:
    empty = customer(admin_api, credit_usd=None)
    assert empty.key["http_status"] == 402

    sign_in(page, live_server, empty.secret)

    expect(page.locator("#balance")).to_have_text("$0.00")
    expect(page.locator("#keys tbody tr")).to_contain_text("no balance left (402)")
    expect(page.locator("#no-usage")).to_be_visible()


def test_forms_without_the_csrf_token_are_refused_and_change_nothing(
    live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    acme = customer(admin_api)
    browser_like = support.browser_like()
    form = browser_like.get(f"{live_server}/billing")
    token = csrf_of(form)

    for fields in ({}, {"csrf_token": "forged"}, {"csrf_token": ""}):
        refused = browser_like.post(
            f"{live_server}/billing/sign-in", data={"api_key": acme.secret, **fields}
        )
        assert refused.status_code == 400, refused.text
        assert "Reload the page" in refused.text
    assert "Sign in" in browser_like.get(f"{live_server}/billing").text  # still signed out

    signed = browser_like.post(
        f"{live_server}/billing/sign-in", data={"api_key": acme.secret, "csrf_token": token}
    )
    assert signed.status_code == 200 and "Sign out" in signed.text
    token = csrf_of(signed)  # a new token for the new session
    # Another session's token is no good either.
    other = csrf_of(requests.get(f"{live_server}/billing", timeout=10))
    for fields in ({}, {"csrf_token": other}):
        top_up = browser_like.post(f"{live_server}/billing/top-up", data={"amount": "10", **fields})
        assert top_up.status_code == 400
        sign_out = browser_like.post(f"{live_server}/billing/sign-out", data=fields)
        assert sign_out.status_code == 400
    assert "Sign out" in browser_like.get(f"{live_server}/billing").text  # still signed in
    with Session(committed_web) as db:
        assert db.scalar(select(func.count()).select_from(Payment)) == 0

    out = browser_like.post(f"{live_server}/billing/sign-out", data={"csrf_token": token})
    assert out.status_code == 200 and "Sign in" in out.text


def test_the_session_cookie_is_httponly_samesite_lax_and_secure(
    page: Page, live_server: str, admin_api: FlaskClient
) -> None:
    acme = customer(admin_api)
    raw = requests.get(f"{live_server}/billing", timeout=10).headers["Set-Cookie"]
    assert raw.startswith("billing_session=")
    assert {"HttpOnly", "SameSite=Lax", "Secure", "Path=/billing"} <= {
        part.strip() for part in raw.split(";")
    }

    sign_in(page, live_server, acme.secret)

    (cookie,) = page.context.cookies()
    assert cookie["name"] == "billing_session"
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert cookie["secure"] is True
    assert cookie["path"] == "/billing"
    # The cookie holds only the session's random token: no key, no id.
    assert TOKEN.fullmatch(cookie["value"])
    assert acme.secret not in cookie["value"] and acme.key["id"] not in cookie["value"]
    assert page.evaluate("document.cookie") == ""


def test_sign_in_attempts_are_rate_limited_per_client(
    live_server: str, admin_api: FlaskClient
) -> None:
    acme = customer(admin_api)
    client = support.browser_like()
    token = csrf_of(client.get(f"{live_server}/billing"))
    for _ in range(SIGN_IN_LIMIT):
        wrong = client.post(
            f"{live_server}/billing/sign-in",
            data={"api_key": "sk-" + "1" * 48, "csrf_token": token},
        )
        assert wrong.status_code == 401

    limited = client.post(
        f"{live_server}/billing/sign-in", data={"api_key": acme.secret, "csrf_token": token}
    )

    assert limited.status_code == 429
    assert "Too many sign-in attempts" in limited.text
    assert int(limited.headers["Retry-After"]) >= 1
    assert "Sign out" not in client.get(f"{live_server}/billing").text


def test_signing_in_and_out_with_the_keyboard_only(
    page: Page, live_server: str, admin_api: FlaskClient
) -> None:
    acme = customer(admin_api)
    page.goto(f"{live_server}/billing")
    expect(page.get_by_label("API key")).to_be_focused()  # autofocus
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(acme.secret)
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Sign in")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#balance")).to_have_text("$10.00")

    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Sign out")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_label("API key")).to_be_visible()


def test_a_phone_viewport_has_no_horizontal_scroll(
    browser: Browser,
    live_server: str,
    admin_api: FlaskClient,
    gateway_api: FlaskClient,
    committed_web: Engine,
) -> None:
    acme = customer(admin_api, credit_usd="123456.78", name="A rather long company name, Inc.")
    now = dt.datetime.now(dt.UTC)
    for days in range(0, 30, 2):
        report_usage(gateway_api, acme.key, CODE, now - dt.timedelta(days=days), SEED_002)
        report_usage(gateway_api, acme.key, LITE, now - dt.timedelta(days=days), SEED_002)
    phone = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=3,
        is_mobile=True,
        has_touch=True,
    )
    violations = watch_csp(phone)
    try:
        page = phone.new_page()
        page.goto(f"{live_server}/billing")
        assert _scroll_width(page) <= 390
        sign_in(page, live_server, acme.secret)
        expect(page.locator("#balance")).to_contain_text("$")
        page.get_by_text("Usage as a table").click()
        assert _scroll_width(page) <= 390
        box = page.locator("#usage-chart svg.chart").bounding_box()
        assert box is not None and box["width"] <= 390
    finally:
        phone.close()
    assert violations == []


def _scroll_width(page: Page) -> int:
    return int(page.evaluate("document.documentElement.scrollWidth"))


def test_a_top_up_outside_the_limits_is_refused_on_the_page(
    page: Page, live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    acme = customer(admin_api)
    sign_in(page, live_server, acme.secret)

    page.get_by_label(re.compile("^Other amount in US dollars")).fill("1000000")
    expect(page.get_by_label("Other amount", exact=True)).to_be_checked()  # typing chose it
    with page.expect_response(f"{live_server}/billing/top-up") as answer:
        page.get_by_role("button", name="Continue to payment").click()

    assert answer.value.status == 400
    expect(page.get_by_role("alert")).to_contain_text("between $5.00 and $1,000.00")
    with Session(committed_web) as db:
        assert db.scalar(select(func.count()).select_from(Payment)) == 0


def test_a_revoked_key_signs_the_page_out(
    page: Page, live_server: str, admin_api: FlaskClient
) -> None:
    acme = customer(admin_api)
    sign_in(page, live_server, acme.secret)
    expect(page.locator("#balance")).to_have_text("$10.00")

    assert admin_api.post(f"/admin/v1/keys/{acme.key['id']}/revoke").status_code == 200
    page.reload()

    expect(page.get_by_label("API key")).to_be_visible()
    assert page.request.get(f"{live_server}/billing/balance").status == 401


def test_the_json_endpoints_answer_errors_in_the_api_shape(
    live_server: str, admin_api: FlaskClient
) -> None:
    client = support.browser_like()
    refused = client.get(f"{live_server}/billing/balance")
    assert_json_error(refused, 401, "not_signed_in")
    assert refused.headers["Cache-Control"] == "no-store"
    token = csrf_of(client.get(f"{live_server}/billing"))
    client.post(
        f"{live_server}/billing/sign-in",
        data={"api_key": customer(admin_api).secret, "csrf_token": token},
    )
    assert_json_error(
        client.get(f"{live_server}/billing/balance?payment=pay_nobody"), 404, "not_found"
    )
    # The page's scripts may send the CSRF token as a header instead of a form field.
    unknown = client.post(
        f"{live_server}/billing/top-up/pay_nobody/card",
        data={"token": "tok_x"},
        headers={"X-CSRFToken": csrf_of(client.get(f"{live_server}/billing"))},
    )
    assert_json_error(unknown, 404, "not_found")


def test_back_from_paying_the_page_shows_the_payment_until_it_is_credited(
    page: Page, live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    acme, other = customer(admin_api), customer(admin_api, name="Other Ltd")
    now = dt.datetime.now(dt.UTC)
    with Session(committed_web) as db, db.begin():
        for payment_id, account_id in (
            ("pay_web_1", acme.account_id),
            ("pay_web_2", other.account_id),
        ):
            db.add(
                Payment(
                    id=payment_id,
                    account_id=account_id,
                    source="top_up",
                    mode="checkout",
                    status="pending",
                    amount_cents=2500,
                    refunded_cents=0,
                    created_at=now,
                    updated_at=now,
                )
            )
    sign_in(page, live_server, acme.secret)

    page.goto(f"{live_server}/billing?payment=pay_web_1")
    expect(page.locator("#payment-notice")).to_contain_text("$25.00 is being confirmed")
    expect(page.locator('meta[http-equiv="refresh"]')).to_have_count(1)
    # Another account's payment is not shown.
    page.goto(f"{live_server}/billing?payment=pay_web_2")
    expect(page.locator("#payment-notice")).to_have_count(0)
    expect(page.locator('meta[http-equiv="refresh"]')).to_have_count(0)
    assert page.request.get(f"{live_server}/billing/balance?payment=pay_web_2").status == 404


def test_paying_with_a_card_refuses_bad_tokens_other_accounts_and_declined_cards(
    live_server: str, localstripe_url: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    def started_top_up(secret: str) -> tuple[requests.Session, str, str]:
        client = support.browser_like()
        page = client.get(f"{live_server}/billing")
        signed = client.post(
            f"{live_server}/billing/sign-in", data={"api_key": secret, "csrf_token": csrf_of(page)}
        )
        pay = client.post(
            f"{live_server}/billing/top-up", data={"amount": "10", "csrf_token": csrf_of(signed)}
        )
        assert pay.status_code == 200, pay.text
        url = re.search(r'data-pay-url="([^"]+)"', pay.text)
        assert url
        return client, f"{live_server}{url[1]}", csrf_of(pay)

    client, pay_url, token = started_top_up(customer(admin_api).secret)
    for fields, code in (
        ({"token": "tok_x"}, "csrf_failed"),  # no CSRF token: refused before anything else
        ({"csrf_token": token}, "invalid_request"),
        ({"csrf_token": token, "token": "pm_not_a_token"}, "invalid_request"),
    ):
        assert_json_error(client.post(pay_url, data=fields), 400, code)
    # Another account's payment is not found for this session.
    other, _, other_csrf = started_top_up(customer(admin_api).secret)
    card = _card_token(localstripe_url, "4242424242424242")
    refused = other.post(pay_url, data={"csrf_token": other_csrf, "token": card})
    assert_json_error(refused, 404, "not_found")
    # A declined card (Stripe's test card 4000 0000 0000 0002) is answered 402 with why.
    declined = client.post(
        pay_url,
        data={"csrf_token": token, "token": _card_token(localstripe_url, "4000000000000002")},
    )
    assert assert_json_error(declined, 402, "card_declined")["type"] == "card_error"
    with Session(committed_web) as db:
        statuses = set(db.scalars(select(Payment.status)))
    assert statuses == {"pending"}  # nothing credited


def _card_token(localstripe_url: str, number: str) -> str:
    """A card token as Stripe.js makes one in the browser (with the publishable key)."""
    response = requests.post(
        f"{localstripe_url}/v1/tokens",
        data={
            "card[number]": number,
            "card[exp_month]": "12",
            "card[exp_year]": "2034",
            "card[cvc]": "123",
            "key": PUBLISHABLE_KEY,
        },
        timeout=10,
    )
    response.raise_for_status()
    token: str = response.json()["id"]
    return token
