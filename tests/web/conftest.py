"""Fixtures of the customer-page tests: the app served by a real HTTP server in a thread, its
data committed for real (and truncated after each test), and one headless Chromium for the whole
session, driven by Playwright. Every browser context records Content-Security-Policy
violations, and a test whose pages had any fails.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``); Playwright never
downloads a browser of its own here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright
from sqlalchemy import Engine
from werkzeug.serving import BaseWSGIServer, make_server

from billing.app import create_app
from billing.web.access import limiter
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN, make_settings
from tests.localstripe import PUBLISHABLE_KEY, SECRET_KEY, localstripe_url
from tests.support import client_with

__all__ = ["localstripe_url"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIGN_IN_LIMIT = 5
STRIPE_WEBHOOK_SECRET = "whsec_test_web_page"
# Screenshots of the browser tests, kept for the CI run to publish (ignored by git).
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="session")
def live_app(app: Flask, tmp_path_factory: pytest.TempPathFactory, localstripe_url: str) -> Flask:
    """An app of its own (``app`` has loaded the price table) whose requests commit for real,
    with Stripe pointed at the session's localstripe (and the page at its Stripe.js stand-in)."""
    return create_app(
        make_settings(
            tmp_path_factory.mktemp("web-data"),
            billing_sign_in_rate_limit=f"{SIGN_IN_LIMIT} per minute",
            stripe_api_base=localstripe_url,
            stripe_secret_key=SECRET_KEY,
            stripe_publishable_key=PUBLISHABLE_KEY,
            stripe_webhook_secret=STRIPE_WEBHOOK_SECRET,
            stripe_js_url=f"{localstripe_url}/js.stripe.com/v3/",
            topup_presets_usd="10,20,50",
        )
    )


@pytest.fixture(scope="session")
def live_server(live_app: Flask) -> Iterator[str]:
    """The base URL of ``live_app`` served by a threaded werkzeug server."""
    server: BaseWSGIServer = make_server("127.0.0.1", 0, live_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """One headless Chromium for the session."""
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium (.ci/run does it)")
    chromium = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
    yield chromium
    chromium.close()


@pytest.fixture
def committed_web(live_app: Flask, committed: Engine) -> Iterator[Engine]:
    """Real commits, truncated after the test; sign-in windows start empty."""
    with live_app.app_context():
        limiter().reset()
    yield committed


# Runs in every page and frame before the page's own scripts (Playwright injects it past CSP).
CSP_LISTENER = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.__billingCspViolation(
    `${event.effectiveDirective} refused ${event.blockedURI || "inline"} on ${event.documentURI}`
  );
});
"""


def watch_csp(ctx: BrowserContext) -> list[str]:
    """Every CSP violation in ``ctx``'s pages from now on: each ``securitypolicyviolation``
    event, and each console message Chromium writes about one."""
    seen: list[str] = []

    def report(violation: str) -> None:
        seen.append(violation)

    ctx.expose_function("__billingCspViolation", report)
    ctx.add_init_script(CSP_LISTENER)
    ctx.on(
        "console",
        lambda message: (
            seen.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return seen


@pytest.fixture
def context(browser: Browser, committed_web: Engine) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) for one test, which must see no CSP violation."""
    ctx = browser.new_context()
    violations = watch_csp(ctx)
    yield ctx
    ctx.close()
    assert violations == [], "Content-Security-Policy violations"


@pytest.fixture
def page(context: BrowserContext) -> Page:
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    return tab


@pytest.fixture
def admin_api(live_app: Flask, committed_web: Engine) -> FlaskClient:
    """The served app's admin API, in process (its writes are committed)."""
    return client_with(live_app, ADMIN_TOKEN)


@pytest.fixture
def gateway_api(live_app: Flask, committed_web: Engine) -> FlaskClient:
    """The served app's gateway API, in process (usage reported is settled in process)."""
    return client_with(live_app, GATEWAY_TOKEN)
