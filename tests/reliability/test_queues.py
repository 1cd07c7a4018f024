"""Webhook delivery has a queue of its own (``webhooks``), consumed by its own workers: a
receiver that hangs holds up deliveries, never settlement, which stays on ``celery``."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine

from billing.app import MAINTENANCE_QUEUE, MAINTENANCE_TASKS
from billing.runtime import SETTLE_TASK, WEBHOOKS_QUEUE, WEBHOOKS_TASK
from tests.reliability.conftest import Api, Workers, recent, usage_event, wait_until
from tests.reliability.support import assert_settled_exactly_once, ingest, wait_settled

# What each attempt waits for a receiver (WEBHOOK_TIMEOUT_SECONDS in the workers' environment).
TIMEOUT = 2


class HangingReceiver:
    """A webhook endpoint that answers nothing until released: every attempt times out."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.arrivals: list[float] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.arrivals.append(time.monotonic())
                receiver.release.wait(timeout=60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks"


@pytest.fixture
def hanging_receiver() -> Iterator[HangingReceiver]:
    """Released (so the workers can stop) and shut down after the test."""
    receiver = HangingReceiver()
    yield receiver
    receiver.release.set()
    receiver.server.shutdown()
    receiver.server.server_close()


def test_webhook_delivery_is_routed_to_its_own_queue(celery_client: Celery) -> None:
    """The trigger, beat's entry and any other sender of deliver_webhooks reach `webhooks`;
    beat's maintenance tasks reach `maintenance`; everything else stays on the default queue."""
    router = celery_client.amqp.router
    assert router.route({}, WEBHOOKS_TASK)["queue"].name == WEBHOOKS_QUEUE
    assert router.route({}, SETTLE_TASK)["queue"].name == "celery"
    scheduled = {entry["task"] for entry in celery_client.conf.beat_schedule.values()}
    assert set(MAINTENANCE_TASKS) <= scheduled  # a renamed task would fall back to `celery`
    for entry in celery_client.conf.beat_schedule.values():
        queue = router.route(dict(entry.get("options", {})), entry["task"])["queue"].name
        expected = {WEBHOOKS_TASK: WEBHOOKS_QUEUE} | dict.fromkeys(
            MAINTENANCE_TASKS, MAINTENANCE_QUEUE
        )
        assert queue == expected.get(entry["task"], "celery"), entry["task"]


def test_a_hanging_receiver_does_not_delay_settlement(
    api: Api,
    workers: Workers,
    committed: Engine,
    hanging_receiver: HangingReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker per queue, as docker-compose.yml runs them. While the webhook worker waits on
    a receiver that never answers (five deliveries, two seconds each), usage reported meanwhile
    is settled by the other worker, long before the deliveries are through."""
    monkeypatch.setenv("WEBHOOK_TIMEOUT_SECONDS", str(TIMEOUT))
    settler, deliverer = workers.start(1, queues=("celery",)) + workers.start(
        1, queues=(WEBHOOKS_QUEUE,)
    )
    response = api.admin("POST", "/webhook-endpoints", json={"url": hanging_receiver.url})
    assert response.status_code == 201, response.text
    account_id = api.create_account("hooked", credit_usd="100")
    keys = [api.create_key(account_id, f"k{n}") for n in range(5)]  # a key.state_changed each
    wait_until(lambda: hanging_receiver.arrivals, "the first delivery to reach the receiver")

    at, tag = recent(), uuid.uuid4().hex
    events = [usage_event(f"{tag}-{n}", keys[n % 5], 100 + n, 10, at) for n in range(200)]
    posted = time.monotonic()
    ingest(api, events)
    wait_settled(committed, len(events), timeout=TIMEOUT * 5)
    settled_in = time.monotonic() - posted

    assert deliverer.task_results(WEBHOOKS_TASK) == [], "the deliveries were still hanging"
    assert settled_in < TIMEOUT * 2, f"settlement took {settled_in:.1f}s"
    assert_settled_exactly_once(committed, {event["request_id"] for event in events})
    assert settler.received(WEBHOOKS_TASK) == 0
    assert deliverer.received(SETTLE_TASK) == 0
    assert deliverer.received(WEBHOOKS_TASK) >= 1
