"""billing_litellm.reporter against the real billing service: usage is batched, retried under
the same request ids through connection errors and 5xx answers until accepted, and counted
once; holds are released.

The service is a real gunicorn (no Redis: settlement runs in the request) reached through a TCP
proxy that can cut it off; its PostgreSQL sits behind another, so that it answers 503.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from flask import Flask
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from billing.core.settings import Settings
from billing_litellm.client import GatewayClient
from billing_litellm.config import Config
from billing_litellm.reporter import Release, UsageReporter
from tests.conftest import GATEWAY_TOKEN, TEST_DATABASE_URL, truncate_committed, worker_env
from tests.reliability.conftest import Api, rows, start_api, stop, wait_until
from tests.reliability.faults import TcpProxy

MODEL = "doubao-seed-2-0-mini"


@dataclass
class Service:
    api: Api
    front: TcpProxy  # between the reporter and gunicorn
    database: TcpProxy  # between gunicorn and PostgreSQL
    engine: Engine
    key_id: str
    account_id: str

    def reporter(self, *, batch_max: int = 100, flush_ms: int = 20) -> UsageReporter:
        config = Config(
            billing_url=f"http://127.0.0.1:{self.front.port}",
            gateway_token=GATEWAY_TOKEN,
            timeout_seconds=2,
            flush_interval_seconds=flush_ms / 1000,
            batch_max=batch_max,
            retry_max_seconds=0.5,
        )
        return UsageReporter(
            GatewayClient(config),
            flush_interval=config.flush_interval_seconds,
            batch_max=batch_max,
            retry_max=config.retry_max_seconds,
        )

    def stored(self, request_ids: list[str]) -> dict[str, int]:
        """How many usage events each of ``request_ids`` has in PostgreSQL."""
        found = rows(
            self.engine,
            "SELECT request_id, count(*) FROM usage_events WHERE request_id = ANY(:ids)"
            " GROUP BY request_id",
            ids=request_ids,
        )
        return {request_id: count for request_id, count in found}


@pytest.fixture(scope="module")
def service(
    app: Flask, redis_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    url = make_url(TEST_DATABASE_URL)
    database = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    database.start()
    proxied = url.set(host="127.0.0.1", port=database.port).render_as_string(hide_password=False)
    env = {
        name: value
        for name, value in worker_env(redis_settings).items()
        if name not in {"REDIS_URL", "CELERY_BROKER_URL"}
    }
    api = start_api(env | {"DATABASE_URL": proxied}, tmp_path_factory.mktemp("reporter") / "log")
    front = TcpProxy(("127.0.0.1", int(api.base.rsplit(":", 1)[1])))
    front.start()
    engine = create_engine(TEST_DATABASE_URL)
    try:
        account_id = api.create_account("reporter", credit_usd="10")
        yield Service(api, front, database, engine, api.create_key(account_id), account_id)
    finally:
        front.stop()
        stop(api.process)
        database.stop()
        truncate_committed(engine)
        engine.dispose()


def events(service: Service, count: int) -> list[dict[str, Any]]:
    occurred = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    return [
        {
            "request_id": f"litellm-{uuid.uuid4().hex}",
            "key_id": service.key_id,
            "model": MODEL,
            "usage": {"prompt_tokens": 10 + n, "completion_tokens": 5},
            "occurred_at": occurred,
            "outcome": "completed",
        }
        for n in range(count)
    ]


def test_usage_is_sent_in_batches_of_at_most_batch_max(service: Service) -> None:
    reporter = service.reporter(batch_max=40, flush_ms=200)
    sent = events(service, 100)
    for event in sent:
        reporter.report(event)

    assert reporter.flush(timeout=30)
    ids = [event["request_id"] for event in sent]
    assert service.stored(ids) == dict.fromkeys(ids, 1)
    assert reporter.counts.sent == 100 and reporter.counts.retries == 0


def test_a_lone_event_goes_after_the_flush_interval(service: Service) -> None:
    reporter = service.reporter(batch_max=1000, flush_ms=100)
    (event,) = events(service, 1)
    reporter.report(event)

    wait_until(lambda: service.stored([event["request_id"]]), "the event sent", timeout=10)
    wait_until(lambda: reporter.pending() == 0, "the answer read", timeout=10)
    assert reporter.counts.sent == 1


def test_connection_errors_are_retried_until_the_service_is_back(service: Service) -> None:
    reporter = service.reporter()
    sent = events(service, 30)
    service.front.stop()
    try:
        for event in sent:
            reporter.report(event)
        wait_until(lambda: reporter.counts.retries >= 3, "three failed attempts")
        assert reporter.pending() > 0
    finally:
        service.front.start()

    assert reporter.flush(timeout=30)
    ids = [event["request_id"] for event in sent]
    assert service.stored(ids) == dict.fromkeys(ids, 1)


def test_5xx_answers_are_retried_under_the_same_request_ids(service: Service) -> None:
    reporter = service.reporter()
    sent = events(service, 30)
    service.database.stop()  # the service answers 503 for every batch meanwhile
    try:
        for event in sent:
            reporter.report(event)
        wait_until(lambda: reporter.counts.retries >= 3, "three 503 answers")
        assert reporter.counts.sent == 0
    finally:
        service.database.start()

    assert reporter.flush(timeout=60)
    ids = [event["request_id"] for event in sent]
    assert service.stored(ids) == dict.fromkeys(ids, 1)
    assert reporter.counts.sent == 30


def test_events_the_service_rejects_are_logged_not_retried(service: Service) -> None:
    reporter = service.reporter()
    good, bad = events(service, 2)
    bad["key_id"] = "key_unknown"
    reporter.report(good)
    reporter.report(bad)

    assert reporter.flush(timeout=30)
    assert service.stored([good["request_id"], bad["request_id"]]) == {good["request_id"]: 1}
    assert (reporter.counts.sent, reporter.counts.rejected) == (1, 1)
    assert reporter.counts.rejections[0]["request_id"] == bad["request_id"]


def test_a_released_hold_frees_the_available_balance(service: Service) -> None:
    key = service.api.admin("POST", f"/accounts/{service.account_id}/keys", json={"name": "r"})
    assert key.status_code == 201, key.text
    request_id = f"litellm-{uuid.uuid4().hex}"
    authorized = requests.post(
        f"{service.api.base}/gateway/v1/authorize",
        json={"api_key": key.json()["key"], "model": MODEL, "request_id": request_id},
        headers={"Authorization": f"Bearer {GATEWAY_TOKEN}"},
        timeout=10,
    )
    assert authorized.status_code == 200, authorized.text
    account = service.api.admin("GET", f"/accounts/{service.account_id}").json()
    assert account["held_usd"] != "0.000000000"
    balance = account["balance_usd"]

    reporter = service.reporter()
    reporter.release(
        Release(
            hold_id=authorized.json()["hold_id"],
            failed_event={
                "request_id": request_id,
                "key_id": key.json()["id"],
                "model": MODEL,
                "input_tokens": 0,
                "output_tokens": 0,
                "outcome": "failed",
            },
        )
    )
    assert reporter.flush(timeout=30)

    account = service.api.admin("GET", f"/accounts/{service.account_id}").json()
    assert (account["held_usd"], account["balance_usd"]) == ("0.000000000", balance)
