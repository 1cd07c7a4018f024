"""The service's Prometheus metrics: every counter and histogram a process records, in one place.

What a process does is counted here by the edges and the runtime, from results they already
hold (a usage report's answer, a settlement batch, a committed transaction's marks); the domain
records nothing. What the database and Redis hold (the settlement lag, open holds, ...) is not
counted but read when scraped (``billing.health.gauges``).

Several processes: gunicorn's workers and Celery's pool each count in their own memory, so with
``PROMETHEUS_MULTIPROC_DIR`` set (before this module is imported: prometheus_client chooses its
storage then) each process writes its values to files in that directory and a scrape of any of
them sums the files of all (``exposition``). The API and the workers share the directory, so
one ``/metrics`` answers for all of them. A process's files are named after the host and its
pid, so containers sharing the directory as a volume (each with its own pid 1) never write to
each other's. Counters of processes that have exited keep counting in the sums (what they did
happened); only gauges written by processes would need gunicorn's ``child_exit`` hook
(``mark_process_dead``), and there are none: every gauge here is computed at scrape time.

Values are floats, as Prometheus's are: the nano-dollar counter is exact up to 2**53 nano-dollars
(about $9 million) and approximate beyond; the ledger, not this, is the record of money.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

if MULTIPROC_DIR:
    _HOST = socket.gethostname().replace("_", "-")
    # Before any metric exists: its values are created from this class.
    _values.ValueClass = _values.MultiProcessValue(  # type: ignore[no-untyped-call]
        lambda: f"{_HOST}-{os.getpid()}"
    )

# Usage (billing.api.gateway, runtime.settle_pending)
USAGE_EVENTS = Counter(
    "billing_usage_events",
    "Usage events answered at ingest, by outcome: accepted, duplicate or rejected.",
    ["outcome"],
)
SETTLED_EVENTS = Counter("billing_usage_settled_events", "Usage events settled (priced, charged).")
CHARGED_NANOS = Counter(
    "billing_usage_charged_nanodollars", "Nano-dollars charged to accounts for settled usage."
)

# Authorize (billing.api.hot in front of Flask, and billing.api.gateway behind it)
AUTHORIZE_DECISIONS = Counter(
    "billing_authorize_decisions",
    "Authorize answers, by HTTP status and code (allowed, or the refusal's error code), and by "
    "path: fast (memory and Redis, in front of Flask) or app (the Flask route, with PostgreSQL).",
    ["status", "code", "path"],
)
AUTHORIZE_SECONDS = Histogram(
    "billing_authorize_duration_seconds",
    "Time from receiving an authorize request to its answer, by path (fast or app).",
    ["path"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
AUTHORIZE_FAST_SECONDS = AUTHORIZE_SECONDS.labels(path="fast")
AUTHORIZE_APP_SECONDS = AUTHORIZE_SECONDS.labels(path="app")

# Keys, webhooks, Stripe (runtime.after_commit, runtime.deliver_webhooks, api.stripe_webhook)
KEY_STATE_CHANGES = Counter(
    "billing_key_state_changes", "Key-state changes committed, by the new state.", ["state"]
)
WEBHOOK_DELIVERIES = Counter(
    "billing_webhook_deliveries",
    "Gateway webhook attempts, by outcome: succeeded, retry_scheduled or failed (retries spent).",
    ["outcome"],
)
STRIPE_EVENTS = Counter(
    "billing_stripe_webhook_events",
    "Stripe webhook events received, by event type and outcome: applied, duplicate, error, or "
    "invalid_signature (type unverified).",
    ["type", "outcome"],
)

# Every request Flask serves (billing.api.ops.instrument)
HTTP_SECONDS = Histogram(
    "billing_http_request_duration_seconds",
    "Time Flask takes to answer a request (commit included), by method, route (the URL rule, "
    "e.g. /admin/v1/accounts/<account_id>; unmatched for none) and status.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def count_usage(*, accepted: int, duplicates: int, rejected: int) -> None:
    """Count the outcomes of one usage report."""
    for outcome, count in (
        ("accepted", accepted),
        ("duplicate", duplicates),
        ("rejected", rejected),
    ):
        if count:
            USAGE_EVENTS.labels(outcome=outcome).inc(count)


def count_authorize(status: int, code: str, *, path: str) -> None:
    """Count one authorize answer."""
    AUTHORIZE_DECISIONS.labels(status=str(status), code=code, path=path).inc()


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def exposition(scraped: Iterable[Metric] = ()) -> bytes:
    """The text exposition of every metric recorded (by all the processes sharing
    ``PROMETHEUS_MULTIPROC_DIR``, when it is set), followed by the ``scraped`` families."""
    if MULTIPROC_DIR:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=MULTIPROC_DIR)  # type: ignore[no-untyped-call]
        recorded = generate_latest(registry)
    else:
        recorded = generate_latest(REGISTRY)
    return recorded + generate_latest(_Families(scraped))
