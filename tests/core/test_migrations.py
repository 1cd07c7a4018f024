"""The schema comes only from migrations: they match the models and run both ways."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from billing.core.db import make_engine
from billing.core.migrate import alembic_config
from billing.schema import metadata
from tests.conftest import TEST_DATABASE_URL


def test_postgres_schema_matches_the_models(migrated_database: str) -> None:
    with create_engine(TEST_DATABASE_URL).connect() as connection:
        diff = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}), metadata
        )
    assert diff == []


def test_sqlite_migrates_up_down_and_up_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'roundtrip.sqlite3'}"
    config = alembic_config(url)
    command.upgrade(config, "head")
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert set(metadata.tables) <= tables
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    assert set(metadata.tables) <= set(inspect(engine).get_table_names())


def test_sqlite_with_data_keeps_it_through_gateway_v2(tmp_path: Path) -> None:
    """Key events get their sequences, sent events keep their webhook-id, subscribers of
    key.state_changed hear of new keys; and SQLite's table copies keep rows others refer to."""
    url = f"sqlite:///{tmp_path / 'data.sqlite3'}"
    config = alembic_config(url)
    command.upgrade(config, "8b3e5f2a9c14")
    engine = make_engine(url)
    rows: list[tuple[str, dict[str, Any]]] = [
        (
            "INSERT INTO accounts (id, name, balance_nanos, held_nanos, balance_version,"
            " created_at) VALUES ('a', 'n', 0, 0, 0, :at)",
            {},
        ),
        *(
            (
                "INSERT INTO api_keys (id, account_id, name, key_hash, display_prefix, last4,"
                " state, held_nanos, created_at) VALUES (:key, 'a', 'n', :key, 'sk-x', 'abcd',"
                " 'active', 0, :at)",
                {"key": key},
            )
            for key in ("k1", "k2")
        ),
        *(
            (
                "INSERT INTO key_state_changes (key_id, new_state, reason, created_at)"
                " VALUES (:key, 'active', 'r', :at)",
                {"key": key},
            )
            for key in ("k1", "k2", "k1", "k1")
        ),
        (
            "INSERT INTO webhook_events (type, payload, created_at)"
            " VALUES ('key.state_changed', '{}', :at)",
            {},
        ),
        *(
            (
                "INSERT INTO webhook_endpoints (id, url, event_types, secret_salt, created_at)"
                " VALUES (:id, 'http://x', :types, 's', :at)",
                {"id": endpoint, "types": json.dumps([kind])},
            )
            for endpoint, kind in (("e1", "key.state_changed"), ("e2", "topup.succeeded"))
        ),
        (
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, status, attempts,"
            " next_attempt_at, created_at) VALUES (1, 'e1', 'pending', 0, :at, :at)",
            {},
        ),
    ]
    with engine.begin() as connection:
        for statement, values in rows:
            connection.execute(text(statement), {"at": "2026-01-01 00:00:00", **values})

    command.upgrade(config, "head")
    with engine.connect() as connection:
        sequences = "SELECT key_id, sequence FROM key_state_changes ORDER BY id"
        assert connection.execute(text(sequences)).all() == [
            ("k1", 1),
            ("k2", 1),
            ("k1", 2),
            ("k1", 3),
        ]
        counters = "SELECT id, event_sequence FROM api_keys ORDER BY id"
        assert connection.execute(text(counters)).all() == [("k1", 3), ("k2", 1)]
        assert connection.execute(text("SELECT message_id FROM webhook_events")).all() == [
            ("evt_1",)
        ]
        subscribed = "SELECT id, event_types FROM webhook_endpoints ORDER BY id"
        assert [
            (endpoint, json.loads(types))
            for endpoint, types in connection.execute(text(subscribed))
        ] == [("e1", ["key.created", "key.state_changed"]), ("e2", ["topup.succeeded"])]
        assert connection.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar() == 1

    command.downgrade(config, "8b3e5f2a9c14")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar() == 1
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
