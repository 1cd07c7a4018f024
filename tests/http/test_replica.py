"""Reads that may lag go to a real streaming replica (DATABASE_READ_URL); money never does.

A primary and a hot standby are started for the session (``tests.replica``). While the standby's
replay is paused, usage settled and credit added on the primary are exact at once wherever money
is shown (the admin account, the subscription's limit, the page's amounts and ledger), and absent
from every report read from the replica (the usage report and its CSV, the dashboard usage, the
page's chart) until replay resumes.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import InternalError

from billing.app import create_app
from billing.catalog import catalog
from billing.core.db import make_read_engine, transaction, utcnow
from billing.core.migrate import upgrade
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN, make_settings
from tests.replica import ReplicaPair, start_replica_pair
from tests.support import assert_error, client_with, new_key

MINI, CODE = "doubao-seed-2-0-mini", "doubao-seed-2-0-code"
# 1000 input and 100 output tokens at the shipped prices ($0.14/$0.69 and $1.49/$6.99 per M).
MINI_NANOS = 1000 * 140 + 100 * 690
CODE_NANOS = 1000 * 1490 + 100 * 6990
CREDIT_NANOS, TOP_UP_NANOS = 10_000_000_000, 5_000_000_000
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="session")
def replica_pair() -> Iterator[ReplicaPair]:
    """A migrated primary and its streaming replica, stopped and removed after the session."""
    pair = start_replica_pair()
    try:
        upgrade(pair.primary_url)
        pair.wait_replayed()
        yield pair
    finally:
        pair.stop()


def app_on(pair: ReplicaPair, data_dir: Path, *, read_url: str) -> Flask:
    """An app on the pair's primary that reads reports from ``read_url``, with the price table."""
    app = create_app(
        make_settings(data_dir, database_url=pair.primary_url, database_read_url=read_url)
    )
    runtime: Runtime = app.extensions["billing"]
    with transaction(runtime.sessions) as session:
        catalog.import_prices(session, catalog.default_price_file(), now=utcnow())
    return app


@pytest.fixture(scope="module")
def replicated(replica_pair: ReplicaPair, tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return app_on(
        replica_pair, tmp_path_factory.mktemp("replica"), read_url=replica_pair.replica_url
    )


def usd(nanos: int) -> str:
    return f"{Decimal(nanos).scaleb(-9):.9f}"


def new_customer(admin: FlaskClient) -> tuple[str, dict[str, Any]]:
    """A fresh account credited $10, and a key of it (with its secret)."""
    account_id = admin.post("/admin/v1/accounts", json={"name": "Replica Inc"}).get_json()["id"]
    credit(admin, account_id, CREDIT_NANOS)
    return account_id, new_key(admin, account_id)


def credit(admin: FlaskClient, account_id: str, nanos: int) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": usd(nanos), "reason": "replica test credit"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert response.status_code == 201, response.get_json()


def spend(gateway: FlaskClient, key: dict[str, Any], model: str) -> None:
    """One call of 1000 input and 100 output tokens, settled in-process before this returns."""
    occurred = (utcnow() - dt.timedelta(minutes=1)).isoformat()
    response = gateway.post(
        "/gateway/v1/usage",
        json={
            "request_id": uuid.uuid4().hex,
            "key_id": key["id"],
            "model": model,
            "input_tokens": 1000,
            "output_tokens": 100,
            "occurred_at": occurred,
        },
    )
    assert response.status_code == 202, response.get_json()


def report(admin: FlaskClient, account_id: str) -> dict[str, int]:
    """The admin usage report of the account: cost in nano-dollars by model."""
    response = admin.get(f"/admin/v1/usage?account_id={account_id}&group_by=model")
    assert response.status_code == 200, response.get_json()
    return {
        row["model"]: int(Decimal(row["cost_usd"]).scaleb(9)) for row in response.get_json()["data"]
    }


def csv_models(admin: FlaskClient, account_id: str) -> list[str]:
    response = admin.get(f"/admin/v1/usage?account_id={account_id}&group_by=model&format=csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    return [line.split(",")[0] for line in response.get_data(as_text=True).splitlines()[1:]]


def dashboard_cents(client: FlaskClient, secret: str) -> Decimal:
    today = utcnow().date()
    response = client.get(
        f"/v1/dashboard/billing/usage?start_date={today - dt.timedelta(days=1)}"
        f"&end_date={today + dt.timedelta(days=1)}",
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 200, response.get_json()
    return Decimal(str(response.get_json()["total_usage"]))


def balance(admin: FlaskClient, account_id: str) -> str:
    body = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    assert body["balance_usd"] == body["available_usd"]  # no open holds here
    return str(body["balance_usd"])


def rollup_models_on_primary(pair: ReplicaPair, account_id: str) -> set[str]:
    with psycopg.connect(pair.url(pair.primary_port, driver="postgresql")) as connection:
        rows = connection.execute(
            "SELECT DISTINCT model_id FROM usage_rollups WHERE account_id = %s", (account_id,)
        )
        return {str(model) for (model,) in rows}


def test_reports_lag_behind_a_paused_replica_while_money_is_exact_at_once(
    replica_pair: ReplicaPair, replicated: Flask
) -> None:
    admin, gateway = client_with(replicated, ADMIN_TOKEN), client_with(replicated, GATEWAY_TOKEN)
    client = replicated.test_client()
    account_id, key = new_customer(admin)
    spend(gateway, key, MINI)
    replica_pair.wait_replayed()
    assert report(admin, account_id) == {MINI: MINI_NANOS}

    replica_pair.pause_replay()
    try:
        spend(gateway, key, CODE)
        credit(admin, account_id, TOP_UP_NANOS)
        # Settled on the primary, not yet replayed on the replica.
        assert rollup_models_on_primary(replica_pair, account_id) == {MINI, CODE}

        # Money reads the primary: exact at once.
        expected = CREDIT_NANOS + TOP_UP_NANOS - MINI_NANOS - CODE_NANOS
        assert balance(admin, account_id) == usd(expected)
        subscription = client.get(
            "/v1/dashboard/billing/subscription", headers={"Authorization": f"Bearer {key['key']}"}
        ).get_json()
        # The balance plus this month's usage (both read from the primary), as a JSON number.
        assert Decimal(str(subscription["hard_limit_usd"])) == Decimal(
            str(float(Decimal(expected + MINI_NANOS + CODE_NANOS).scaleb(-9)))
        )

        # Reports read the replica: as of before the pause.
        assert report(admin, account_id) == {MINI: MINI_NANOS}
        assert csv_models(admin, account_id) == [MINI]
        assert dashboard_cents(client, key["key"]) == Decimal(MINI_NANOS) / 10_000_000
    finally:
        replica_pair.resume_replay()

    assert report(admin, account_id) == {MINI: MINI_NANOS, CODE: CODE_NANOS}
    assert csv_models(admin, account_id) == [CODE, MINI]
    assert dashboard_cents(client, key["key"]) == Decimal(MINI_NANOS + CODE_NANOS) / 10_000_000


def page_sections(client: FlaskClient) -> dict[str, str]:
    """The signed-in page's sections by the id of their heading."""
    response = client.get("/billing")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    return dict(re.findall(r'<section aria-labelledby="([\w-]+)"(.*?)</section>', page, re.S))


def signed_in(app: Flask, secret: str) -> FlaskClient:
    """A browser-like client of ``app`` (https, for the Secure cookie) signed in with ``secret``."""
    client = app.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    form = client.get("/billing").get_data(as_text=True)
    token = CSRF.search(form)
    assert token is not None
    response = client.post("/billing/sign-in", data={"api_key": secret, "csrf_token": token[1]})
    assert response.status_code == 303
    return client


def test_the_page_shows_a_credit_at_once_and_the_chart_once_replayed(
    replica_pair: ReplicaPair, replicated: Flask
) -> None:
    admin, gateway = client_with(replicated, ADMIN_TOKEN), client_with(replicated, GATEWAY_TOKEN)
    account_id, key = new_customer(admin)
    spend(gateway, key, MINI)
    replica_pair.wait_replayed()
    browser = signed_in(replicated, key["key"])

    replica_pair.pause_replay()
    try:
        spend(gateway, key, CODE)
        credit(admin, account_id, TOP_UP_NANOS)
        sections = page_sections(browser)
        expected = Decimal(CREDIT_NANOS + TOP_UP_NANOS - MINI_NANOS - CODE_NANOS).scaleb(-9)
        assert f'<dd id="balance">${expected.normalize()}</dd>' in "".join(sections.values())
        assert sections["ledger-title"].count("replica test credit") == 2  # both credits
        assert MINI in sections["usage-title"] and CODE not in sections["usage-title"]
    finally:
        replica_pair.resume_replay()
    assert CODE in page_sections(browser)["usage-title"]


def test_a_replica_out_of_reach_fails_the_reports_only(
    replica_pair: ReplicaPair, tmp_path: Path
) -> None:
    """Reports answer 503 in the error shape; money and the page (without its chart) still work."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens once the socket is closed
    app = app_on(
        replica_pair, tmp_path, read_url=f"postgresql://postgres@127.0.0.1:{closed}/billing"
    )
    admin = client_with(app, ADMIN_TOKEN)
    account_id, key = new_customer(admin)

    assert_error(admin.get(f"/admin/v1/usage?account_id={account_id}"), 503, "service_unavailable")
    assert_error(
        app.test_client().get(
            "/v1/dashboard/billing/usage?start_date=2026-01-01&end_date=2026-01-02",
            headers={"Authorization": f"Bearer {key['key']}"},
        ),
        503,
        "service_unavailable",
    )
    assert balance(admin, account_id) == usd(CREDIT_NANOS)
    sections = page_sections(signed_in(app, key["key"]))
    assert 'id="usage-unavailable"' in sections["usage-title"]
    assert "replica test credit" in sections["ledger-title"]


def test_the_read_engine_refuses_writes_even_on_a_primary(replica_pair: ReplicaPair) -> None:
    engine = make_read_engine(replica_pair.primary_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
            with pytest.raises(InternalError, match="read-only transaction"):
                connection.execute(text("CREATE TABLE written (id int)"))
    finally:
        engine.dispose()


def test_database_read_url_takes_our_driver_and_needs_a_postgresql_primary(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_read_url="postgres://reader@replica:5432/billing")
    assert settings.sqlalchemy_read_url == "postgresql+psycopg://reader@replica:5432/billing"
    assert make_settings(tmp_path).sqlalchemy_read_url is None
    with pytest.raises(ValidationError, match="must be a PostgreSQL URL"):
        make_settings(tmp_path, database_read_url="sqlite:///replica.sqlite3")
    with pytest.raises(ValidationError, match="set both"):
        make_settings(tmp_path, database_url=None, database_read_url="postgresql://r@replica/b")
