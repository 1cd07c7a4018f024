"""The bench's database: created anew, migrated and funded; polled for settlement; vacuumed and
checkpointed between phases (autovacuum is off on this server)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench.harness.environment import ADMIN_TOKEN, GATEWAY_TOKEN, SECRET_KEY, recreate_database
from bench.harness.processes import Services
from bench.metering.config import Config


def settings_for(config: Config, data_dir: Path) -> Any:
    from billing.core.settings import Settings

    return Settings(
        _env_file=None,
        database_url=config.sqlalchemy_url,
        redis_url=config.redis_url,
        secret_key=SECRET_KEY,
        billing_admin_token=ADMIN_TOKEN,
        billing_gateway_token=GATEWAY_TOKEN,
        data_dir=data_dir,
        log_level="WARNING",
    )


def prepare_database(config: Config, data_dir: Path) -> tuple[list[str], Any]:
    """Migrate, load the default prices, open funded accounts with keys; the key ids and the
    Celery client of the bench's Redis."""
    from billing.accounts import accounts, keys
    from billing.app import create_app
    from billing.catalog import catalog
    from billing.core.db import utcnow
    from billing.core.migrate import upgrade
    from billing.core.money import parse_usd
    from billing.ledger import ledger

    recreate_database(config.pg, config.database)
    upgrade(config.sqlalchemy_url)
    app = create_app(settings_for(config, data_dir))
    runtime = app.extensions["billing"]
    key_ids = []
    with runtime.transaction() as session:
        catalog.import_prices(session, catalog.default_price_file(), now=utcnow())
        for a in range(config.accounts):
            account = accounts.create_account(
                session, name=f"bench account {a}", email=None, now=utcnow()
            )
            ledger.post(
                session,
                ledger.Posting(
                    account.id,
                    ledger.EntryKind.ADJUSTMENT,
                    parse_usd("10000000"),
                    "benchmark credit",
                    "bench",
                ),
                low_balance_nanos=runtime.settings.balance_low_threshold,
                now=utcnow(),
            )
            for k in range(config.keys_per_account):
                key, _secret = keys.issue_key(
                    session,
                    account_id=account.id,
                    settings=keys.KeySettings(
                        name=f"bench key {k}",
                        rate_limit=None,
                        monthly_cap_nanos=None,
                        allowed_models=None,
                        expires_at=None,
                    ),
                    hmac_key=runtime.settings.hmac_key,
                    now=utcnow(),
                )
                key_ids.append(key.id)
    runtime.engine.dispose()
    return key_ids, app.extensions["celery"]


@contextmanager
def connect(config: Config) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(config.dsn, autocommit=True) as conn:
        yield conn


def any_pending(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM usage_events WHERE status = 'pending')"
    ).fetchone()
    return bool(row and row[0])


def wait_settled(
    conn: psycopg.Connection[Any], deadline: float, services: Services, interval: float = 0.05
) -> float:
    """Poll until no event is pending; the time it was first seen so."""
    checked = time.monotonic()
    while any_pending(conn):
        if time.monotonic() > deadline:
            raise RuntimeError("events still pending at the deadline: settlement stalled")
        if time.monotonic() - checked > 2:
            services.check()
            checked = time.monotonic()
        time.sleep(interval)
    return time.time()


def max_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(id), 0) FROM usage_events").fetchone()
    return int(row[0]) if row else 0


def statuses(conn: psycopg.Connection[Any], after: int) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status, count(*) FROM usage_events WHERE id > %s GROUP BY status", [after]
    ).fetchall()
    return {status: int(count) for status, count in rows}


def checkpoint(config: Config) -> None:
    """Every timed phase starts from a fresh checkpoint."""
    with connect(config) as conn:
        conn.execute("CHECKPOINT")


def vacuum(config: Config, tables: Sequence[str]) -> None:
    """Autovacuum is off on this server: the harness stands in for it between phases."""
    with connect(config) as conn:
        for table in tables:
            conn.execute(f"VACUUM (ANALYZE) {table}")


# Before the throughput phase the database is in the state a production one is in between
# bursts: usage_events analysed with (almost) nothing pending, so the claim query takes the
# ordered partial index. ledger_entries is left unanalysed (the planner then assumes a table of
# some size, as a production ledger is): statistics of its few warm-up rows would have every
# worker plan the foreign-key check of settlement's UPDATE as a sequential scan, whose cost then
# grows with the ledger during the run (autovacuum's re-analyses prevent that in production).
STEADY_STATE_TABLES = ("usage_events", "usage_rollups")
ALL_TABLES = ("usage_events", "usage_rollups", "accounts", "ledger_entries")
