"""Celery tasks: thin wrappers around one runtime or domain call each, safe to run twice."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from billing.accounts import keys
from billing.core.db import utcnow
from billing.payments.auto_recharge import run_auto_recharge
from billing.payments.reconcile import reconcile
from billing.runtime import current_runtime

log = logging.getLogger(__name__)

# Events re-priced at random from the whole history on each hourly run, so that a change below
# the watermark is found in time without the run's cost growing with the history.
RECONCILE_SAMPLE = 100


@shared_task(acks_late=True)
def settle_usage() -> int:
    """Settle pending usage until none is left; returns the number of events claimed."""
    return current_runtime().settle_pending()


@shared_task(acks_late=True)
def sweep() -> int:
    """Beat's safety net: settle what lost triggers left behind and catch the mirror up."""
    runtime = current_runtime()
    runtime.sync_mirror()
    return runtime.settle_pending()


@shared_task(acks_late=True)
def expire_holds() -> int:
    """Release holds whose request reported no usage within their lifetime; returns how many."""
    return current_runtime().expire_holds()


@shared_task(acks_late=True)
def deliver_webhooks() -> int:
    """Send due webhook deliveries, new ones and retries; returns the number of attempts."""
    return current_runtime().deliver_webhooks()


@shared_task(acks_late=True)
def monthly_rollover() -> int:
    """Return keys held at the monthly quota to active once the month has turned; returns the
    number of keys that changed."""
    with current_runtime().transaction() as session:
        changed = keys.refresh_quota_keys(session, now=utcnow())
    return len(changed)


@shared_task(acks_late=True)
def reconcile_ledger() -> list[str]:
    """Check balances, the charges settled since the last clean run and a random sample of older
    ones; returns the drift."""
    drift = [str(item) for item in current_runtime().reconcile(sample=RECONCILE_SAMPLE).drift]
    for line in drift:
        log.error("reconcile: %s", line)
    return drift


@shared_task(acks_late=True)
def reconcile_stripe() -> list[str]:
    """Credit recent succeeded Stripe payments no webhook credited; returns their Stripe ids."""
    runtime = current_runtime()
    with runtime.transaction() as session:
        return reconcile(session, settings=runtime.settings, now=utcnow())


@shared_task(acks_late=True)
def auto_recharge() -> int:
    """Charge the saved cards of accounts below their auto-recharge threshold; returns the
    number of charges attempted."""
    runtime = current_runtime()
    return run_auto_recharge(runtime.transaction, settings=runtime.settings, clock=utcnow)


@worker_ready.connect
def _rebuild_mirror(**_: Any) -> None:
    """A worker starting may find Redis empty: rebuild the key-state mirror first."""
    from workers.app import flask_app

    with flask_app.app_context():
        written = current_runtime().sync_mirror()
    log.info("key-state mirror in sync (%d keys written)", written)
