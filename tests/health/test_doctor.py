"""`billing doctor` against deployments set up wrong on purpose, and against a healthy one as far
as this machine allows (its PostgreSQL runs with autovacuum off, which the doctor must report)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from billing.catalog import catalog
from billing.cli import main
from billing.core.db import make_engine, make_sessionmaker, transaction, utcnow
from billing.core.migrate import upgrade
from billing.core.settings import Settings
from billing.health.doctor import (
    Finding,
    database_findings,
    diagnose,
    eviction_problem,
    redis_findings,
    settings_findings,
    stripe_findings,
)
from billing.notify.endpoints import create_endpoint
from billing.runtime import Runtime
from tests.conftest import SECRET_KEY, TEST_DATABASE_URL, TEST_REDIS_URL, _recreate_database
from tests.reliability.conftest import free_port
from tests.reliability.faults import RedisServer

FRESH_DATABASE_URL = make_url(TEST_DATABASE_URL).set(
    database=f"{make_url(TEST_DATABASE_URL).database}_doctor"
)
# What a run of the real command needs to see nothing from the environment it runs in.
UNSET = dict.fromkeys(
    [
        "REDIS_URL",
        "SECRET_KEY",
        "STRIPE_SECRET_KEY",
        "STRIPE_PUBLISHABLE_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "STRIPE_API_BASE",
    ]
)


def checks(findings: list[Finding]) -> list[str]:
    return [finding.check for finding in findings]


def doctor(**env: str | None) -> Result:
    return CliRunner().invoke(main, ["doctor"], env=UNSET | env, catch_exceptions=False)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def autovacuum_expected(engine: Engine | str) -> list[str]:
    """This machine's PostgreSQL runs with autovacuum off; another may not."""
    bind = create_engine(engine) if isinstance(engine, str) else engine
    try:
        with bind.connect() as connection:
            return [] if connection.scalar(text("SHOW autovacuum")) == "on" else ["autovacuum"]
    finally:
        if bind is not engine:
            bind.dispose()


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """An empty PostgreSQL database of its own, never migrated."""
    url = FRESH_DATABASE_URL.render_as_string(hide_password=False)
    _recreate_database(url)
    yield url
    maintenance = FRESH_DATABASE_URL.set(database="postgres", drivername="postgresql")
    with psycopg.connect(
        maintenance.render_as_string(hide_password=False), autocommit=True
    ) as connection:
        connection.execute(f'DROP DATABASE "{FRESH_DATABASE_URL.database}" WITH (FORCE)')


def test_a_fresh_database_is_not_migrated_then_has_no_prices(fresh_database: str) -> None:
    engine = make_engine(fresh_database)
    try:
        findings = database_findings(engine, clock=utcnow)
        assert checks(findings) == [*autovacuum_expected(engine), "migrations"]
        assert "never migrated" in findings[-1].problem
        assert "billing db upgrade" in findings[-1].fix

        upgrade(fresh_database)
        findings = database_findings(engine, clock=utcnow)
        assert checks(findings) == [*autovacuum_expected(engine), "prices", "webhooks"]
        assert "billing prices import" in findings[-2].fix
    finally:
        engine.dispose()


def test_the_command_reports_each_problem_on_a_line_and_fails(
    fresh_database: str, tmp_path: Path
) -> None:
    result = doctor(
        DATABASE_URL=fresh_database, DATA_DIR=str(tmp_path), STRIPE_SECRET_KEY="sk_test_x"
    )
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        *autovacuum_expected(fresh_database),
        "migrations",
        "secret_key",
        "stripe",
    ]
    assert all(" Fix: " in line for line in lines)
    assert "STRIPE_PUBLISHABLE_KEY, STRIPE_WEBHOOK_SECRET not" in lines[-1]
    assert f"{len(lines)} problem(s) found" in result.stderr
    assert not (tmp_path / "secret_key").exists()  # the doctor changes nothing


def test_a_healthy_deployment_has_nothing_but_this_machines_autovacuum(
    runtime: Runtime, committed: Engine
) -> None:
    with transaction(runtime.sessions) as session:
        assert catalog.has_models(session)  # the app fixture loaded the shipped table
        create_endpoint(
            session,
            url="https://gateway.example/hooks",
            event_types=None,
            hmac_key=b"k",
            allow_private=False,
            now=utcnow(),
        )
    client = redis.Redis.from_url(TEST_REDIS_URL)
    healthy = settings(
        database_url=TEST_DATABASE_URL, redis_url=TEST_REDIS_URL, secret_key=SECRET_KEY
    )
    try:
        findings = diagnose(healthy, runtime.engine, client, clock=utcnow)
    finally:
        client.close()
    assert checks(findings) == autovacuum_expected(runtime.engine)
    if findings:
        assert findings[0].problem.startswith("PostgreSQL autovacuum is off")
        assert "autovacuum = on" in findings[0].fix


def test_the_embedded_default_with_everything_in_place_passes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    with transaction(make_sessionmaker(engine)) as session:
        catalog.import_prices(session, catalog.default_price_file(), now=utcnow())
        create_endpoint(
            session,
            url="https://gateway.example/h",
            event_types=None,
            hmac_key=b"k",
            allow_private=False,
            now=utcnow(),
        )
    engine.dispose()

    result = doctor(DATABASE_URL=url, DATA_DIR=str(tmp_path))
    assert (result.exit_code, result.stdout) == (0, "all checks passed\n")


def test_a_missing_sqlite_file_is_reported_not_created(tmp_path: Path) -> None:
    result = doctor(DATA_DIR=str(tmp_path), DATABASE_URL=None)
    assert result.exit_code == 1
    assert result.stdout.startswith("database: the SQLite database")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_services_are_reported(tmp_path: Path) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    findings = diagnose(
        settings(database_url=nowhere, secret_key=SECRET_KEY),
        make_engine(nowhere),
        client,
        clock=utcnow,
    )
    assert checks(findings) == ["database", "redis"]
    assert "Connection refused" in findings[0].problem or "failed" in findings[0].problem
    assert findings[1].problem.startswith("cannot reach Redis")


def test_a_clock_apart_from_postgresql_is_reported(runtime: Runtime) -> None:
    def ahead() -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=60)

    assert "clock" not in checks(database_findings(runtime.engine, clock=utcnow))
    skewed = [f for f in database_findings(runtime.engine, clock=ahead) if f.check == "clock"]
    assert len(skewed) == 1
    assert "differ by 60 s" in skewed[0].problem


@pytest.mark.parametrize(
    ("maxmemory", "policy", "evicts"),
    [
        (0, "noeviction", None),
        (64 << 20, "noeviction", None),
        (64 << 20, "allkeys-lru", "reaches maxmemory"),
        (64 << 20, "volatile-ttl", "reaches maxmemory"),
        (0, "allkeys-lfu", "once a maxmemory limit is set"),
        (0, "volatile-lru", "once a maxmemory limit is set"),
    ],
)
def test_the_eviction_decision(maxmemory: int, policy: str, evicts: str | None) -> None:
    problem = eviction_problem(maxmemory, policy)
    if evicts is None:
        assert problem is None
    else:
        assert problem is not None and evicts in problem and policy in problem


@pytest.fixture
def configurable_redis(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """A client of a redis-server of this test's own, whose configuration it may change."""
    client = redis.Redis(port=own_redis.port, socket_connect_timeout=1)
    yield client
    client.close()


def test_the_eviction_policy_is_read_from_the_server(configurable_redis: redis.Redis) -> None:
    assert redis_findings(configurable_redis) == []  # Redis's default: noeviction
    configurable_redis.config_set("maxmemory", 64 << 20)
    configurable_redis.config_set("maxmemory-policy", "allkeys-lru")
    (finding,) = redis_findings(configurable_redis)
    assert finding.check == "redis"
    assert (
        f"reaches maxmemory ({64 << 20} bytes) by maxmemory-policy allkeys-lru" in finding.problem
    )
    assert "noeviction" in finding.fix


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({}, None),
        (
            {"stripe_secret_key": "sk_test_a", "stripe_publishable_key": "pk_test_a"},
            "STRIPE_PUBLISHABLE_KEY, STRIPE_SECRET_KEY set but STRIPE_WEBHOOK_SECRET not,"
            " so top-ups cannot be credited",
        ),
        (
            {"stripe_webhook_secret": "whsec_a"},
            "STRIPE_WEBHOOK_SECRET set but STRIPE_SECRET_KEY, STRIPE_PUBLISHABLE_KEY not,"
            " so top-ups fail",
        ),
        ({"stripe_api_base": "http://127.0.0.1:8420"}, "STRIPE_API_BASE is set but no"),
        (
            {
                "stripe_secret_key": "sk_live_a",
                "stripe_publishable_key": "pk_test_a",
                "stripe_webhook_secret": "whsec_a",
            },
            "different modes",
        ),
        (
            {
                "stripe_secret_key": "rk_test_a",
                "stripe_publishable_key": "pk_test_a",
                "stripe_webhook_secret": "whsec_a",
            },
            None,
        ),
    ],
)
def test_stripe_settings_belong_together(values: dict[str, str], problem: str | None) -> None:
    findings = stripe_findings(settings(**values))
    if problem is None:
        assert findings == []
    else:
        (finding,) = findings
        assert problem in finding.problem


def test_a_missing_secret_key_matters_only_beyond_the_embedded_default(tmp_path: Path) -> None:
    assert settings_findings(settings(data_dir=tmp_path)) == []
    for deployed in (
        settings(data_dir=tmp_path, database_url=TEST_DATABASE_URL),
        settings(data_dir=tmp_path, redis_url=TEST_REDIS_URL),
    ):
        (finding,) = settings_findings(deployed)
        assert (finding.check, finding.problem[:22]) == ("secret_key", "SECRET_KEY is not set:")
    assert settings_findings(settings(database_url=TEST_DATABASE_URL, secret_key=SECRET_KEY)) == []
