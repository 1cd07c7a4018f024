"""Worker tasks, run by a real Celery worker process over the real Redis broker."""

from __future__ import annotations

import subprocess

from celery import Celery
from sqlalchemy import Engine, text

from billing.accounts import accounts
from billing.core.db import transaction, utcnow
from billing.core.money import parse_usd
from billing.ledger import ledger
from billing.runtime import Runtime


def test_reconcile_task_finds_drift_in_a_real_worker(
    runtime: Runtime, committed: Engine, celery_client: Celery, worker: subprocess.Popen[bytes]
) -> None:
    with transaction(runtime.sessions) as session:
        healthy = accounts.create_account(session, name="healthy", email=None, now=utcnow())
        tampered = accounts.create_account(session, name="tampered", email=None, now=utcnow())
        for account, amount in ((healthy, "12.5"), (tampered, "3")):
            ledger.post(
                session,
                ledger.Posting(
                    account.id, ledger.EntryKind.ADJUSTMENT, parse_usd(amount), "credit", "test"
                ),
                low_balance_nanos=runtime.settings.balance_low_threshold,
                now=utcnow(),
            )

    assert celery_client.send_task("workers.tasks.reconcile_ledger").get(timeout=30) == []

    with committed.begin() as connection:
        connection.execute(
            text("UPDATE accounts SET balance_nanos = balance_nanos + 1 WHERE id = :id"),
            {"id": tampered.id},
        )
    drift = celery_client.send_task("workers.tasks.reconcile_ledger").get(timeout=30)
    assert drift == [f"{tampered.id}: balance 3.000000001 USD, entries sum to 3.000000000 USD"]


def test_every_beat_entry_names_a_registered_task(celery_client: Celery) -> None:
    celery_client.loader.import_default_modules()
    scheduled = {entry["task"] for entry in celery_client.conf.beat_schedule.values()}
    assert "workers.tasks.reconcile_ledger" in scheduled
    assert scheduled <= set(celery_client.tasks)
