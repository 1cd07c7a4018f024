"""Scaling out the workers: any number of worker processes per queue, each queue its own.

Settlement (the default queue, ``celery``) is shared by two worker processes that claim batches
with ``FOR UPDATE SKIP LOCKED``; beat's long and outward-calling tasks go to ``maintenance``, so
a reconciliation stuck on a slow Stripe holds up neither of them.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine

from billing.app import MAINTENANCE_QUEUE
from billing.runtime import SETTLE_TASK
from tests.reliability.conftest import (
    Api,
    Workers,
    recent,
    status_counts,
    usage_event,
    wait_until,
)
from tests.reliability.support import assert_settled_exactly_once, ingest, wait_settled

RECONCILE_STRIPE = "workers.tasks.reconcile_stripe"
EVENTS = 6_000  # three full settlement batches: both workers get one at once


def reconciled(log: str) -> bool:
    """Whether a worker's log says a Stripe reconciliation succeeded."""
    return re.search(rf"Task {re.escape(RECONCILE_STRIPE)}\[[\w-]+\] succeeded", log) is not None


class SlowStripe:
    """A Stripe API that answers nothing until released, then an empty list of payments."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.arrivals: list[str] = []
        stripe = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stripe.arrivals.append(self.path)
                stripe.release.wait(timeout=120)
                body = json.dumps({"object": "list", "data": [], "has_more": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"


@pytest.fixture
def slow_stripe() -> Iterator[SlowStripe]:
    """Released (so the workers can stop) and shut down after the test."""
    stripe = SlowStripe()
    yield stripe
    stripe.release.set()
    stripe.server.shutdown()
    stripe.server.server_close()


def test_two_settlement_workers_share_the_queue_while_maintenance_is_stuck(
    api: Api,
    workers: Workers,
    committed: Engine,
    celery_client: Celery,
    slow_stripe: SlowStripe,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As production scales out: two worker processes on the settlement queue and one on
    maintenance, whose Stripe reconciliation hangs. The two drain one backlog together, each
    event settled exactly once, before the reconciliation has had an answer."""
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_scale_out")
    monkeypatch.setenv("STRIPE_API_BASE", slow_stripe.url)
    (maintainer,) = workers.start(1, queues=(MAINTENANCE_QUEUE,))
    keys = []
    for number in range(2):
        account_id = api.create_account(f"scale-{number}", credit_usd="1000")
        keys += [api.create_key(account_id, f"k{k}") for k in range(2)]
    at, tag = recent(), uuid.uuid4().hex
    events = [
        usage_event(f"{tag}-{n}", keys[n % len(keys)], 100 + n % 977, n % 101, at)
        for n in range(EVENTS)
    ]
    ingest(api, events)  # no settlement worker yet: all of them wait, pending
    assert status_counts(committed) == {"pending": EVENTS}
    celery_client.control.purge()  # the API's triggers: the two tasks below replace them

    celery_client.send_task(RECONCILE_STRIPE)
    wait_until(lambda: slow_stripe.arrivals, "the reconciliation to call Stripe")
    first, second = workers.start(2, queues=("celery",))
    posted = time.monotonic()
    celery_client.send_task(SETTLE_TASK)
    celery_client.send_task(SETTLE_TASK)
    wait_settled(committed, EVENTS)
    settled_in = time.monotonic() - posted

    assert not slow_stripe.release.is_set() and not reconciled(maintainer.log_text())
    assert_settled_exactly_once(committed, {event["request_id"] for event in events})

    # Each settlement worker claimed part of the backlog, and together exactly all of it.
    def claimed() -> tuple[list[int], list[int]] | None:
        results = first.task_results(SETTLE_TASK), second.task_results(SETTLE_TASK)
        return results if sum(map(sum, results)) == EVENTS else None

    by_first, by_second = wait_until(claimed, "both workers to log their settle results")
    assert sum(by_first) > 0 and sum(by_second) > 0, (by_first, by_second, settled_in)
    assert maintainer.received(SETTLE_TASK) == 0
    assert first.received(RECONCILE_STRIPE) == second.received(RECONCILE_STRIPE) == 0

    slow_stripe.release.set()
    wait_until(
        lambda: reconciled(maintainer.log_text()),
        "the reconciliation to finish once Stripe answers",
    )
