"""End to end with real processes: an API configured for Redis commits, a real Celery worker
settles usage and delivers the signed webhooks, a real HTTP receiver verifies them (DESIGN 6.4).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import Engine

from billing.app import create_app
from billing.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN, start_worker
from tests.notify.conftest import (
    Received,
    Receiver,
    key_changes,
    new_account,
    new_key,
    register,
)
from tests.support import client_with


@pytest.fixture(scope="module")
def redis_app(redis_settings: Settings, app: Flask) -> Flask:
    """An API that commits for real and hands work to workers (``app`` loaded the prices)."""
    return create_app(redis_settings)


@pytest.fixture
def retrying_worker(
    redis_settings: Settings,
    celery_client: Celery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker whose retry schedule is 0.5 s, 0.5 s (WEBHOOK_RETRY_SCHEDULE)."""
    monkeypatch.setenv("WEBHOOK_RETRY_SCHEDULE", "0.5,0.5")
    process = start_worker(
        redis_settings, celery_client, name=f"hooks{os.getpid()}", log=tmp_path / "worker.log"
    )
    yield process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def test_a_key_flipped_to_402_in_a_worker_reaches_the_gateway_signed_and_authorize_refuses_it(
    committed: Engine,
    redis_app: Flask,
    worker: subprocess.Popen[bytes],
    receiver: Receiver,
) -> None:
    admin = client_with(redis_app, ADMIN_TOKEN)
    gateway = client_with(redis_app, GATEWAY_TOKEN)
    register(admin, receiver, ["key.state_changed"])
    account_id = new_account(admin, credit="0.01")
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/keys", json={"name": "k", "rate_limit": "100/second"}
    )
    key = response.get_json()

    def authorize(request_id: str) -> Any:
        return gateway.post(
            "/gateway/v1/authorize",
            json={
                "api_key": key["key"],
                "model": "doubao-seed-2-0-lite",
                "request_id": request_id,
                "max_output_tokens": 10,
            },
        )

    assert authorize("req-overrun").status_code == 200  # holds $0.0000199 of the $0.01
    # The request ran long: 10,000 output tokens cost $0.0199, past the balance.
    usage = gateway.post(
        "/gateway/v1/usage",
        json={
            "request_id": "req-overrun",
            "key_id": key["id"],
            "model": "doubao-seed-2-0-lite",
            "input_tokens": 0,
            "output_tokens": 10_000,
        },
    )
    assert usage.status_code == 202

    def flipped(requests: list[Received]) -> list[dict[str, Any]]:
        return [c for c in key_changes(requests, key["id"]) if c["new_state"] != "active"]

    [flip] = receiver.wait_for(flipped, "the signed key.state_changed of the 402")
    assert flip["old_state"] == "active"
    assert (flip["new_state"], flip["http_status"]) == ("insufficient_balance", 402)
    assert flip["reason"] == "usage settled"
    assert flip["account_id"] == account_id
    assert all(request.error is None for request in receiver.requests())
    state = admin.get(f"/admin/v1/keys/{key['id']}").get_json()
    assert (state["state"], state["http_status"]) == ("insufficient_balance", 402)
    # As soon as the gateway hears of it, authorize refuses the key.
    refused = authorize("req-next")
    assert refused.status_code == 402
    assert refused.get_json()["error"]["code"] == "insufficient_balance"
    account = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    # Charged in full, the hold released: the overdraft is exactly the overrun.
    assert (account["balance_usd"], account["held_usd"]) == ("-0.009900000", "0.000000000")


def test_a_worker_retries_on_the_configured_schedule_until_the_receiver_takes_it(
    committed: Engine,
    redis_app: Flask,
    celery_client: Celery,
    retrying_worker: subprocess.Popen[bytes],
    receiver: Receiver,
) -> None:
    admin = client_with(redis_app, ADMIN_TOKEN)
    endpoint_id = register(admin, receiver, ["key.created"])
    receiver.script = [500, 500]
    new_key(admin, new_account(admin))

    deadline = time.monotonic() + 30
    while not any(request.answered == 200 for request in receiver.requests()):
        assert time.monotonic() < deadline, receiver.requests()
        celery_client.send_task("workers.tasks.deliver_webhooks")  # what beat does every 5 s
        time.sleep(0.3)

    assert [request.answered for request in receiver.requests()] == [500, 500, 200]
    assert all(request.error is None for request in receiver.requests())
    [summary] = admin.get(f"/admin/v1/webhook-endpoints/{endpoint_id}/deliveries").get_json()[
        "data"
    ]
    detail = admin.get(f"/admin/v1/webhook-deliveries/{summary['id']}").get_json()
    assert detail["status"] == "succeeded"
    assert [attempt["status_code"] for attempt in detail["attempt_log"]] == [500, 500, 200]
