"""Alembic environment: the schema is created only by these migrations, in tests too."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from billing.core.db import make_engine
from billing.core.settings import Settings
from billing.schema import metadata

config = context.config


def run_migrations() -> None:
    url = config.attributes.get("url") or Settings().sqlalchemy_url
    connectable = config.attributes.get("connection")
    if connectable is None:
        with make_engine(url).connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    sqlite = connection.dialect.name == "sqlite"
    if connection.dialect.name == "postgresql":
        # Never queue behind live traffic for long, and never run away.
        connection.execute(text("SET lock_timeout = '5s'"))
        connection.execute(text("SET statement_timeout = '5min'"))
    if sqlite:
        # Batch mode alters a SQLite table by copying it and dropping the original, which
        # enforced foreign keys refuse while other rows refer to it (webhook deliveries to
        # their events, say). Off for the migration (outside any transaction, where SQLite
        # honours it), and every reference checked once it has run.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
    if sqlite:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()
        if broken:
            raise RuntimeError(f"the migration left rows referring to nothing: {broken[:5]}")


run_migrations()
