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
    if connection.dialect.name == "postgresql":
        # Never queue behind live traffic for long, and never run away.
        connection.execute(text("SET lock_timeout = '5s'"))
        connection.execute(text("SET statement_timeout = '5min'"))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


run_migrations()
