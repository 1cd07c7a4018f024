"""Setting up customers for the page tests through the served app's own APIs."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import requests
from flask.testing import FlaskClient
from playwright.sync_api import Page

from tests.support import ERROR_KEYS

# The shipped price table, and seed 002's Responses API usage (88 in, 230 out of which 211
# reasoning): 88 x $1.49/M + 230 x $6.99/M = $0.00173882 on doubao-seed-2-0-code.
CODE, LITE, MINI = "doubao-seed-2-0-code", "doubao-seed-2-0-lite", "doubao-seed-2-0-mini"
SEED_002 = {
    "input_tokens": 88,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 230,
    "output_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Customer:
    account_id: str
    key: dict[str, Any]  # the admin API's answer, secret in "key"

    @property
    def secret(self) -> str:
        return str(self.key["key"])


def customer(
    admin: FlaskClient, *, credit_usd: str | None = "10.00", name: str = "Acme Inc"
) -> Customer:
    """An account with a key (402 while empty), credited ``credit_usd`` if given."""
    account = admin.post("/admin/v1/accounts", json={"name": name}).get_json()
    response = admin.post(f"/admin/v1/accounts/{account['id']}/keys", json={"name": "production"})
    assert response.status_code == 201, response.get_json()
    if credit_usd is not None:
        credit = admin.post(
            f"/admin/v1/accounts/{account['id']}/adjustments",
            json={"amount_usd": credit_usd, "reason": "welcome credit"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert credit.status_code == 201, credit.get_json()
    return Customer(account["id"], response.get_json())


def sign_in(page: Page, base: str, secret: str) -> None:
    """Sign in through the form, as a person would."""
    page.goto(f"{base}/billing")
    page.get_by_label("API key").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def browser_like() -> requests.Session:
    """A requests session that keeps the page's cookie as a browser does on 127.0.0.1.

    The session cookie is Secure; browsers send it to http://127.0.0.1 (a secure context), but
    requests sends Secure cookies over https only, so each one is kept again without the flag.
    """
    client = requests.Session()

    def keep(response: requests.Response, *_: Any, **__: Any) -> None:
        for cookie in response.cookies:
            client.cookies.set(cookie.name, cookie.value or "", path=cookie.path)

    client.hooks["response"].append(keep)
    return client


def csrf_of(response: requests.Response) -> str:
    """The CSRF token in a page's forms."""
    found = CSRF.search(response.text)
    assert found, response.text
    return found.group(1)


def assert_json_error(
    response: requests.Response, status: int, code: str, param: str | None = None
) -> dict[str, Any]:
    """``response`` is the API's error shape, ``{"error": {"message", "type", "param", "code"}}``,
    with this status and code (naming ``param`` if given)."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]
