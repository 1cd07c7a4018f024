"""The page's sessions live on the server: a cookie copied from a browser stops working when the
session ends (sign-out, the key revoked, disabled or rotated, idle or too old), and signing in
never turns a cookie that existed before into a signed-in one. Through HTTP, against the real
server and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from billing.accounts.page_sessions import TOKEN, PageSession
from billing.app import create_app
from billing.core.ids import keyed_hash
from tests.conftest import ADMIN_TOKEN, SECRET_KEY, TEST_DATABASE_URL, make_settings
from tests.reliability.faults import TcpProxy
from tests.support import client_with
from tests.web import support
from tests.web.support import CSRF, assert_json_error, csrf_of, customer

COOKIE = "billing_session"


def signed_in_client(live_server: str, secret: str) -> requests.Session:
    """A browser-like client signed in with ``secret`` through the form."""
    client = support.browser_like()
    form = client.get(f"{live_server}/billing")
    signed = client.post(
        f"{live_server}/billing/sign-in", data={"api_key": secret, "csrf_token": csrf_of(form)}
    )
    assert signed.status_code == 200 and "Sign out" in signed.text, signed.text
    return client


def cookie_of(client: requests.Session) -> str | None:
    """The session cookie ``client`` sends (``browser_like`` keeps it without a domain)."""
    return client.cookies.get(COOKIE, domain="")


def copy_of(client: requests.Session) -> requests.Session:
    """Another client holding only a copy of ``client``'s session cookie."""
    token = cookie_of(client)
    assert token
    thief = requests.Session()
    thief.cookies.set(COOKIE, token, path="/billing")
    return thief


def csrf_of_text(page: str) -> str:
    found = CSRF.search(page)
    assert found, page
    return found.group(1)


def assert_signed_in(live_server: str, client: requests.Session) -> None:
    balance = client.get(f"{live_server}/billing/balance", timeout=10)
    assert balance.status_code == 200, balance.text
    assert "Sign out" in client.get(f"{live_server}/billing", timeout=10).text


def assert_signed_out(live_server: str, client: requests.Session) -> None:
    assert_json_error(
        client.get(f"{live_server}/billing/balance", timeout=10), 401, "not_signed_in"
    )
    page = client.get(f"{live_server}/billing", timeout=10)
    assert "Sign out" not in page.text and 'name="api_key"' in page.text


def stored_sessions(engine: Engine) -> int:
    with Session(engine) as db:
        return int(db.scalar(select(func.count()).select_from(PageSession)) or 0)


def test_the_cookie_is_an_opaque_token_stored_only_as_its_keyed_hash(
    live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    acme = customer(admin_api)
    client = signed_in_client(live_server, acme.secret)
    token = cookie_of(client)
    assert token and TOKEN.fullmatch(token)
    for private in (acme.secret, acme.key["id"], acme.account_id):
        assert private not in token
    with Session(committed_web) as db:
        row = db.get(PageSession, keyed_hash(SECRET_KEY.encode(), token))
        assert row is not None and row.key_id == acme.key["id"]
        assert db.scalar(select(func.count()).where(PageSession.token_hash == token)) == 0


def test_a_copied_cookie_stops_working_after_sign_out(
    live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    client = signed_in_client(live_server, customer(admin_api).secret)
    thief = copy_of(client)
    assert_signed_in(live_server, thief)
    page = client.get(f"{live_server}/billing")
    token = csrf_of(page)

    out = client.post(f"{live_server}/billing/sign-out", data={"csrf_token": token})

    assert out.status_code == 200 and 'name="api_key"' in out.text
    assert out.history[0].status_code == 303
    assert f"{COOKIE}=;" in out.history[0].headers["Set-Cookie"]  # the browser drops it
    assert_signed_out(live_server, thief)
    # The ended session's CSRF token is no good any more either.
    late = thief.post(f"{live_server}/billing/top-up", data={"amount": "10", "csrf_token": token})
    assert late.status_code == 400 and "Reload the page" in late.text
    with Session(committed_web) as db:
        keys_signed_in = db.scalar(select(func.count()).where(PageSession.key_id.is_not(None)))
    assert keys_signed_in == 0


def test_signing_in_starts_a_new_session_and_the_old_cookie_stays_signed_out(
    live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    acme = customer(admin_api)
    client = support.browser_like()
    form = client.get(f"{live_server}/billing")
    before = cookie_of(client)
    assert before  # the sign-in form's session: its CSRF token only
    # Someone who planted or copied that cookie before the sign-in...
    planted = copy_of(client)

    signed = client.post(
        f"{live_server}/billing/sign-in", data={"api_key": acme.secret, "csrf_token": csrf_of(form)}
    )

    assert "Sign out" in signed.text
    after = cookie_of(client)
    assert after and after != before
    # ... is not signed in by it, and the old form's CSRF token is dead with its session.
    assert_signed_out(live_server, planted)
    assert_signed_in(live_server, client)
    assert csrf_of(signed) != csrf_of(form)
    with Session(committed_web) as db:
        assert db.get(PageSession, keyed_hash(SECRET_KEY.encode(), before)) is None


@pytest.mark.parametrize(
    ("what", "change"),
    [
        ("revoked", lambda admin, key: admin.post(f"/admin/v1/keys/{key['id']}/revoke")),
        ("rotated", lambda admin, key: admin.post(f"/admin/v1/keys/{key['id']}/rotate")),
        (
            "disabled, then enabled again",
            lambda admin, key: (
                admin.patch(f"/admin/v1/keys/{key['id']}", json={"disabled": True}),
                admin.patch(f"/admin/v1/keys/{key['id']}", json={"disabled": False}),
            )[-1],
        ),
    ],
)
def test_a_session_ends_with_the_key_it_signed_in_with(
    live_server: str,
    admin_api: FlaskClient,
    committed_web: Engine,
    what: str,
    change: Callable[[FlaskClient, dict[str, object]], object],
) -> None:
    acme = customer(admin_api)
    other_key = admin_api.post(
        f"/admin/v1/accounts/{acme.account_id}/keys", json={"name": "other"}
    ).get_json()
    client = signed_in_client(live_server, acme.secret)
    other = signed_in_client(live_server, other_key["key"])
    thief = copy_of(client)

    answer = change(admin_api, acme.key)

    assert getattr(answer, "status_code", None) == 200, what
    assert_signed_out(live_server, thief)
    assert_signed_out(live_server, client)
    assert_signed_in(live_server, other)  # a session of another key of the account goes on
    with Session(committed_web) as db:
        left = db.scalar(select(func.count()).where(PageSession.key_id == acme.key["id"]))
    assert left == 0  # ended for good: nothing can bring it back


@pytest.mark.parametrize(
    "aged",
    [
        pytest.param({"last_seen_at": dt.timedelta(minutes=31)}, id="idle"),
        pytest.param(
            {"created_at": dt.timedelta(hours=12, seconds=1), "last_seen_at": dt.timedelta()},
            id="too old, though in use",
        ),
    ],
)
def test_an_idle_or_too_old_session_ends(
    live_server: str,
    admin_api: FlaskClient,
    committed_web: Engine,
    aged: dict[str, dt.timedelta],
) -> None:
    acme = customer(admin_api)
    client = signed_in_client(live_server, acme.secret)
    thief = copy_of(client)
    now = dt.datetime.now(dt.UTC)
    with Session(committed_web) as db, db.begin():
        db.execute(
            update(PageSession)
            .where(PageSession.key_id == acme.key["id"])
            .values({column: now - age for column, age in aged.items()})
        )

    assert_signed_out(live_server, thief)
    assert_signed_out(live_server, client)


def test_ended_sessions_are_purged_when_a_new_one_starts(
    live_server: str, admin_api: FlaskClient, committed_web: Engine
) -> None:
    signed_in_client(live_server, customer(admin_api).secret)
    requests.get(f"{live_server}/billing", timeout=10)  # a visitor who never signs in
    assert stored_sessions(committed_web) == 2  # the sign-in ended its form's session
    with Session(committed_web) as db, db.begin():
        db.execute(
            update(PageSession).values(last_seen_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )

    requests.get(f"{live_server}/billing", timeout=10)  # another visitor

    assert stored_sessions(committed_web) == 1  # theirs; the two ended ones are gone


def test_the_database_out_of_reach_answers_503_and_keeps_the_session(
    committed: Engine, pg_proxy: TcpProxy, tmp_path: Path
) -> None:
    host = f"127.0.0.1:{pg_proxy.port}"
    proxied = TEST_DATABASE_URL.replace("127.0.0.1:5432", host)
    assert host in proxied, "TEST_DATABASE_URL must name 127.0.0.1:5432"
    app = create_app(make_settings(tmp_path, database_url=proxied))
    acme = customer(client_with(app, ADMIN_TOKEN))
    browser = app.test_client()
    form = browser.get("/billing")
    signed = browser.post(
        "/billing/sign-in",
        data={"api_key": acme.secret, "csrf_token": csrf_of_text(form.get_data(as_text=True))},
        follow_redirects=True,
    )
    assert "Sign out" in signed.get_data(as_text=True)

    pg_proxy.stop()
    try:
        cut_off = browser.get("/billing/balance")
    finally:
        pg_proxy.start()

    assert cut_off.status_code == 503
    assert cut_off.get_json()["error"]["code"] == "service_unavailable"
    assert "Set-Cookie" not in cut_off.headers  # the cookie is not dropped for a blip
    assert browser.get("/billing/balance").status_code == 200  # still signed in
