"""The `billing` command line, run in-process with click's runner against real databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, create_engine, select, text

from billing.accounts import accounts
from billing.app import create_app
from billing.catalog.catalog import PriceVersion
from billing.cli import main
from billing.core.db import transaction, utcnow
from billing.core.migrate import upgrade
from billing.core.money import parse_usd
from billing.ledger import ledger
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, SECRET_KEY, TEST_DATABASE_URL, make_settings


def run(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """A fresh SQLite database of the embedded kind, migrated but with no price table yet."""
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
        "REDIS_URL": "",
        "DATA_DIR": str(tmp_path),
    }
    upgrade(env["DATABASE_URL"])
    return env


@pytest.fixture
def postgres_env(committed: Engine) -> dict[str, str]:
    return {
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": "",
        "SECRET_KEY": SECRET_KEY,
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
    }


def versions(env: dict[str, str]) -> list[tuple[str, int, int]]:
    with create_engine(env["DATABASE_URL"]).connect() as connection:
        rows = connection.execute(
            select(
                PriceVersion.model_id,
                PriceVersion.input_nanos_per_m,
                PriceVersion.output_nanos_per_m,
            ).order_by(PriceVersion.id)
        )
        return [
            (model_id, input_nanos, output_nanos) for model_id, input_nanos, output_nanos in rows
        ]


def write_prices(path: Path, **lite: str) -> Path:
    document = {
        "models": [
            {
                "id": "doubao-seed-2-0-lite",
                "input_price_per_m": "0.39",
                "output_price_per_m": "1.99",
                **lite,
            },
        ]
    }
    path.write_text(json.dumps(document))
    return path


def test_default_price_table_imports_once(sqlite_env: dict[str, str]) -> None:
    first = run("prices", "import", env=sqlite_env)
    assert first.exit_code == 0, first.output
    assert "3 price version(s) added" in first.output
    assert sorted((m, i, o) for m, i, o in versions(sqlite_env)) == [
        ("doubao-seed-2-0-code", parse_usd("1.49"), parse_usd("6.99")),
        ("doubao-seed-2-0-lite", parse_usd("0.39"), parse_usd("1.99")),
        ("doubao-seed-2-0-mini", parse_usd("0.14"), parse_usd("0.69")),
    ]
    again = run("prices", "import", env=sqlite_env)
    assert "0 price version(s) added" in again.output
    assert len(versions(sqlite_env)) == 3
    assert "already loaded" in run("prices", "import", "--if-empty", env=sqlite_env).output


def test_db_upgrade_loads_the_default_price_table_into_an_empty_database_only(
    tmp_path: Path,
) -> None:
    empty = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}",
        "REDIS_URL": "",
        "DATA_DIR": str(tmp_path),
    }
    first = run("db", "upgrade", env=empty)
    assert first.exit_code == 0, first.output
    assert "loaded the default price table (3 price version(s))" in first.output
    assert len(versions(empty)) == 3
    again = run("db", "upgrade", env=empty)
    assert again.exit_code == 0 and "loaded" not in again.output
    assert len(versions(empty)) == 3

    operated = empty | {"DATABASE_URL": f"sqlite:///{tmp_path / 'operated.sqlite3'}"}
    upgrade(operated["DATABASE_URL"])
    own = run("prices", "import", str(write_prices(tmp_path / "own.json")), env=operated)
    assert own.exit_code == 0, own.output
    result = run("db", "upgrade", env=operated)
    assert result.exit_code == 0 and "loaded" not in result.output
    assert versions(operated) == [("doubao-seed-2-0-lite", parse_usd("0.39"), parse_usd("1.99"))]


def test_changed_price_adds_a_version_and_keeps_the_old(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    assert (
        run("prices", "import", str(write_prices(tmp_path / "a.json")), env=sqlite_env).exit_code
        == 0
    )
    result = run(
        "prices",
        "import",
        str(write_prices(tmp_path / "b.json", output_price_per_m="2.49")),
        env=sqlite_env,
    )
    assert result.exit_code == 0, result.output
    assert versions(sqlite_env) == [
        ("doubao-seed-2-0-lite", parse_usd("0.39"), parse_usd("1.99")),
        ("doubao-seed-2-0-lite", parse_usd("0.39"), parse_usd("2.49")),
    ]


def test_bad_price_file_names_the_field_and_changes_nothing(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        main,
        ["prices", "import", str(write_prices(tmp_path / "bad.json", input_price_per_m="cheap"))],
        env=sqlite_env,
    )
    assert result.exit_code != 0
    assert "input_price_per_m" in result.output
    assert versions(sqlite_env) == []


def test_reconcile_exits_non_zero_on_drift(
    postgres_env: dict[str, str], runtime: Runtime, committed: Engine
) -> None:
    with transaction(runtime.sessions) as session:
        account = accounts.create_account(session, name="cli", email=None, now=utcnow())
        ledger.post(
            session,
            ledger.Posting(
                account.id, ledger.EntryKind.ADJUSTMENT, parse_usd("5"), "credit", "test"
            ),
            low_balance_nanos=runtime.settings.balance_low_threshold,
            now=utcnow(),
        )
    clean = run("reconcile", env=postgres_env)
    assert clean.exit_code == 0 and clean.output.startswith("ok")

    with committed.begin() as connection:
        connection.execute(
            text("UPDATE accounts SET balance_nanos = 1 WHERE id = :id"), {"id": account.id}
        )
    drifted = run("reconcile", env=postgres_env)
    assert drifted.exit_code == 1
    assert (
        f"DRIFT {account.id}: balance 0.000000001 USD, entries sum to 5.000000000 USD"
        in drifted.output
    )


def test_admin_token_create_prints_a_working_token_once(
    postgres_env: dict[str, str], committed: Engine, tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, ["admin-token", "create", "--name", "ops"], env=postgres_env)
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("adm_") and len(secret) > 40
    client = create_app(make_settings(tmp_path, billing_admin_token=None)).test_client()
    assert (
        client.get("/admin/v1/accounts", headers={"Authorization": f"Bearer {secret}"}).status_code
        == 200
    )
    assert (
        client.get("/admin/v1/accounts", headers={"Authorization": f"Bearer {secret}x"}).status_code
        == 401
    )
    with committed.connect() as connection:
        stored = connection.execute(text("SELECT * FROM service_tokens")).all()
    assert stored and all(secret not in str(row) for row in stored)
