"""Helpers of the pipeline tests: usage posted to the real API, waiting for the real workers to
settle it, and the exactly-once check every such test ends with."""

from __future__ import annotations

import time
from typing import Any

import requests
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing.ledger import ledger
from billing.metering import reconcile
from tests.reliability.conftest import Api, rows, scalar, status_counts, wait_until

SETTLE = "workers.tasks.settle_usage"
SWEEP = "workers.tasks.sweep"
# Beat sends the sweep this often (billing.app.celery_init_app's beat_schedule).
SWEEP_EVERY = 5.0


def ingest(api: Api, events: list[dict[str, Any]], *, batch: int = 1000) -> None:
    """Post ``events`` in batches; every one must be accepted."""
    with requests.Session() as session:
        for start in range(0, len(events), batch):
            chunk = events[start : start + batch]
            response = api.post_usage(chunk, session=session)
            assert response.status_code == 202, response.text
            body = response.json()
            assert (body["accepted"], body["duplicates"], body["rejected"]) == (len(chunk), 0, [])


def wait_settled(
    engine: Engine, expected: int, celery: Celery | None = None, *, timeout: float = 30
) -> None:
    """Wait until nothing is pending and ``expected`` events are settled.

    With ``celery``, sends the sweep every few seconds meanwhile, as beat does in production.
    """
    last_sweep = time.monotonic()

    def done() -> bool:
        nonlocal last_sweep
        if celery is not None and time.monotonic() - last_sweep > SWEEP_EVERY:
            celery.send_task(SWEEP)
            last_sweep = time.monotonic()
        counts = status_counts(engine)
        return counts.get("pending", 0) == 0 and counts.get("settled", 0) >= expected

    wait_until(done, f"{expected} events settled", timeout=timeout, every=0.1)


def assert_settled_exactly_once(engine: Engine, request_ids: set[str]) -> None:
    """Every event settled once: counts, entries against events, balances against entries."""
    assert status_counts(engine) == {"settled": len(request_ids)}
    assert scalar(engine, "SELECT count(DISTINCT request_id) FROM usage_events") == len(request_ids)
    stored = {row.request_id for row in rows(engine, "SELECT request_id FROM usage_events")}
    assert stored == request_ids
    assert scalar(engine, "SELECT count(*) FROM usage_events WHERE ledger_entry_id IS NULL") == 0
    with Session(engine) as session:
        assert [str(item) for item in reconcile.verify_costs(session).mismatches] == []
        assert [str(item) for item in ledger.reconcile(session)] == []
    per_account = rows(
        engine,
        """
        SELECT a.id,
               (SELECT coalesce(sum(amount_nanos), 0) FROM ledger_entries l
                 WHERE l.account_id = a.id AND l.kind = 'usage') AS entries,
               (SELECT coalesce(sum(cost_nanos), 0) FROM usage_events e
                 WHERE e.account_id = a.id) AS costs
        FROM accounts a
        """,
    )
    assert per_account
    for account_id, entries, costs in per_account:
        assert entries == -costs, account_id
