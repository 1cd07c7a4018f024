"""The Content-Security-Policy in real Chromium: the page's own scripts and Stripe.js run (every
page test fails on a violation, see ``conftest.context``), and a script or style slipped into
the page is refused, and seen by the recorder those tests rely on."""

from __future__ import annotations

import re

from flask.testing import FlaskClient
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import Engine

from tests.web.conftest import watch_csp
from tests.web.support import customer, sign_in


def test_an_injected_inline_script_or_style_is_refused_and_recorded(
    browser: Browser, live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    ctx = browser.new_context()
    try:
        violations = watch_csp(ctx)
        page = ctx.new_page()
        sign_in(page, live_server, customer(admin_api).secret)
        expect(page.locator("#balance")).to_have_text("$10.00")
        assert violations == []  # the page itself, its script included, keeps to the policy

        page.evaluate(
            """() => {
              const script = document.createElement("script");
              script.textContent = "window.injected = true;";
              document.body.appendChild(script);
              document.getElementById("balance").setAttribute("style", "color: red");
            }"""
        )

        assert page.evaluate("window.injected") is None
        colour = page.locator("#balance").evaluate("node => getComputedStyle(node).color")
        assert colour != "rgb(255, 0, 0)"
        page.wait_for_timeout(200)  # the reports travel back asynchronously
        assert any(re.match(r"script-src(-elem)? refused inline", v) for v in violations)
        assert any(re.match(r"style-src(-attr)? refused inline", v) for v in violations)
    finally:
        ctx.close()


def test_the_docs_ui_runs_under_its_policy(page: Page, live_server: str) -> None:
    page.goto(f"{live_server}/docs/swagger")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("LLM API billing")
    expect(page.locator(".opblock").first).to_be_visible()
