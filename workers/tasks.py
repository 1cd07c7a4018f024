"""Celery tasks: thin wrappers that open a transaction and call one domain function."""

from __future__ import annotations

import logging

from celery import shared_task

from billing import ledger
from billing.app import current_runtime
from billing.db import transaction

log = logging.getLogger(__name__)


@shared_task(acks_late=True)
def reconcile_ledger() -> list[str]:
    """Check every balance against its ledger entries; returns (and logs) each drift found."""
    with transaction(current_runtime().sessions) as session:
        drift = [str(item) for item in ledger.reconcile(session)]
    for line in drift:
        log.error("ledger drift: %s", line)
    return drift
