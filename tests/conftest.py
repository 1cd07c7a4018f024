"""Fixtures: a dedicated PostgreSQL test database migrated with Alembic, one rolled-back
transaction per test, and the real Redis of this machine.

``TEST_DATABASE_URL`` (default: ``billing_test`` on 127.0.0.1:5432) and ``TEST_REDIS_URL``
(default: database 9 of 127.0.0.1:6379) can point the suite elsewhere.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from billing.app import create_app
from billing.catalog import catalog
from billing.core.db import transaction, utcnow
from billing.core.migrate import upgrade
from billing.core.settings import Settings
from billing.runtime import Runtime
from tests.support import client_with, rolled_back

# Fixtures of their own modules, for every test that needs them; the check that no secret
# reaches the logs of the run (tests/log_secrets.py); pytester, which tests that check.
pytest_plugins = ["tests.reliability.faults", "tests.log_secrets", "pytester"]

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/billing_test"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

# On a shared 2-core machine one example can take longer than Hypothesis's default 200 ms
# deadline, and generating data can trip its too-slow health check, for reasons that have
# nothing to do with the code.
hypothesis_settings.register_profile(
    "shared-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("shared-machine")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Every Hypothesis test runs from one seed, drawn here unless ``--hypothesis-seed`` names
    one, so that any failure is reproduced by running again with that seed."""
    if config.getoption("hypothesis_seed") is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def pytest_sessionstart(session: pytest.Session) -> None:
    """The fixed secrets the tests configure are looked for in the run's logs too."""
    # Imported here, once pytest_plugins has loaded it: an earlier import would keep pytest
    # from rewriting its asserts.
    from tests import log_secrets

    log_secrets.watch(ADMIN_TOKEN, GATEWAY_TOKEN, SECRET_KEY)


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("hypothesis_seed")
    return f"hypothesis seed: {seed} (reproduce a failure with --hypothesis-seed={seed})"


# Secrets as long as the settings demand (billing.core.settings.MIN_SECRET_LENGTH).
ADMIN_TOKEN = "test-admin-token-5c1b8e2f9a7d403e6b1c"
GATEWAY_TOKEN = "test-gateway-token-8e3a6f1d0b9c2754a8e1"
SECRET_KEY = "test-server-secret-2f7d9b4e1c8a6053f2d9"
# The suite's clients all come from 127.0.0.1 and send hundreds of wrong credentials on purpose;
# tests/api/test_auth_failures.py tests the failed-authentication limit with apps of its own.
AUTH_FAILURE_RATE_LIMIT = "100000 per minute"


def _recreate_database(url: str) -> None:
    target = make_url(url)
    maintenance = target.set(database="postgres", drivername="postgresql")
    with psycopg.connect(
        maintenance.render_as_string(hide_password=False), autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{target.database}"')


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for tests: the test database, fixed secrets, no Redis unless asked, and webhooks
    allowed to the receivers the tests run on 127.0.0.1 (tests/notify/test_addresses.py turns
    that off)."""
    values: dict[str, Any] = {
        "database_url": TEST_DATABASE_URL,
        "redis_url": None,
        "secret_key": SECRET_KEY,
        "billing_admin_token": ADMIN_TOKEN,
        "billing_gateway_token": GATEWAY_TOKEN,
        "auth_failure_rate_limit": AUTH_FAILURE_RATE_LIMIT,
        "webhook_allow_private_urls": True,
        "data_dir": data_dir,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def migrated_database() -> str:
    """A fresh test database, migrated to head, holding the shipped price table."""
    _recreate_database(TEST_DATABASE_URL)
    upgrade(TEST_DATABASE_URL)
    return TEST_DATABASE_URL


@pytest.fixture(scope="session")
def app(migrated_database: str, tmp_path_factory: pytest.TempPathFactory) -> Flask:
    flask_app = create_app(make_settings(tmp_path_factory.mktemp("data")))
    runtime: Runtime = flask_app.extensions["billing"]
    with transaction(runtime.sessions) as session:
        catalog.import_prices(session, catalog.default_price_file(), now=utcnow())
    return flask_app


@pytest.fixture
def runtime(app: Flask) -> Runtime:
    runtime: Runtime = app.extensions["billing"]
    return runtime


@pytest.fixture
def db(runtime: Runtime) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test.

    The app's requests join the same transaction through savepoints, so a request's commit is
    visible to the test and nothing outlives it.
    """
    with rolled_back(runtime), runtime.sessions() as session:
        yield session


@pytest.fixture
def client(app: Flask, db: Session) -> FlaskClient:
    """An HTTP client without credentials."""
    return app.test_client()


@pytest.fixture
def admin(app: Flask, db: Session) -> FlaskClient:
    """An HTTP client sending the bootstrap admin token."""
    return client_with(app, ADMIN_TOKEN)


@pytest.fixture
def gateway(app: Flask, db: Session) -> FlaskClient:
    """An HTTP client sending the bootstrap gateway token."""
    return client_with(app, GATEWAY_TOKEN)


def truncate_committed(engine: Engine) -> None:
    """Remove what tests committed for real (the price table stays)."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "TRUNCATE usage_rollups, key_month_spend, ledger_checkpoints,"
                " reconcile_watermarks, usage_events, audit_log, key_state_changes,"
                " ledger_entries, api_keys, accounts, service_tokens,"
                " webhook_attempts, webhook_deliveries, webhook_events, webhook_endpoints"
                " RESTART IDENTITY CASCADE"
            )
        )


@pytest.fixture
def committed(runtime: Runtime) -> Iterator[Engine]:
    """For tests whose data must be seen by other processes: commits for real, then cleans up."""
    yield runtime.engine
    truncate_committed(runtime.engine)


@pytest.fixture(scope="session")
def redis_settings(migrated_database: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings that use the real Redis (a database of its own, flushed) and real workers."""
    import redis

    redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    return make_settings(tmp_path_factory.mktemp("worker-data"), redis_url=TEST_REDIS_URL)


@pytest.fixture(scope="session")
def celery_client(redis_settings: Settings) -> Celery:
    """A Celery app that sends tasks through Redis to real worker processes."""
    celery: Celery = create_app(redis_settings).extensions["celery"]
    return celery


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment a worker process needs to share the tests' database and Redis."""
    assert settings.redis_url and settings.billing_admin_token and settings.secret_key
    return os.environ | {
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": settings.redis_url,
        "CELERY_BROKER_URL": settings.broker_url or "",
        "SECRET_KEY": settings.secret_key.get_secret_value(),
        "BILLING_ADMIN_TOKEN": settings.billing_admin_token.get_secret_value(),
        "BILLING_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "AUTH_FAILURE_RATE_LIMIT": settings.auth_failure_rate_limit,
        "WEBHOOK_ALLOW_PRIVATE_URLS": str(settings.webhook_allow_private_urls).lower(),
        "DATA_DIR": str(settings.data_dir),
    }


# The queues of billing.app's Celery config: settlement and the other short tasks, webhook
# delivery, and beat's long or outward-calling tasks.
QUEUES = ("celery", "webhooks", "maintenance")


def worker_command(
    name: str, queues: tuple[str, ...] = QUEUES, *, as_in_production: bool = False
) -> list[str]:
    """The command line of a real Celery worker process named ``name``, consuming ``queues``
    (by default all, as one worker must when no other consumes the others).

    A lean single-process worker, or ``as_in_production`` one as docker-compose.yml runs it:
    two prefork children, with gossip and mingle.
    """
    options = (
        ["--concurrency=2"]
        if as_in_production
        else ["--pool=solo", "--without-gossip", "--without-mingle"]
    )
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        *options,
        f"--hostname={name}@%h",
        "--loglevel=INFO",
        f"--queues={','.join(queues)}",
    ]


def start_worker(
    settings: Settings, celery: Celery, *, name: str, log: Path
) -> subprocess.Popen[bytes]:
    """A real `celery worker` process, returned once it answers a ping."""
    process = subprocess.Popen(
        worker_command(name),
        env=worker_env(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not any(
        name in host for reply in celery.control.ping(timeout=0.5) or [] for host in reply
    ):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"worker {name} did not start:\n{log.read_text()}")
    return process


@pytest.fixture
def worker(
    redis_settings: Settings, celery_client: Celery, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """One real Celery worker process for the duration of a test."""
    process = start_worker(
        redis_settings, celery_client, name=f"w{os.getpid()}", log=tmp_path / "worker.log"
    )
    yield process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
