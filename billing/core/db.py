"""Database plumbing: the declarative base, column types, engines and sessions.

Domain functions take a ``Session`` and never commit: the caller (an HTTP request, a CLI command,
a Celery task) owns the transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Engine,
    Integer,
    MetaData,
    Select,
    create_engine,
    event,
)
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import DeclarativeBase, InstrumentedAttribute, Session, sessionmaker
from sqlalchemy.sql import ClauseElement
from sqlalchemy.types import TypeDecorator

T = TypeVar("T")

# Integer ids that are 64-bit on PostgreSQL and still autoincrement on SQLite (whose
# autoincrement only works on a column declared exactly INTEGER).
BigIntId = BigInteger().with_variant(Integer(), "sqlite")
MAX_ROW_ID = 2**63 - 1
"""The largest id a BigIntId column holds: a number beyond it names no row."""


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is dt.UTC:  # PostgreSQL sessions run in UTC (see make_engine)
            return value
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Base of every table; constraint names are stable so migrations can refer to them."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime()}


def json_document(value: Any) -> str:
    """``value`` as JSON text for a statement parameter (datetimes as RFC 3339).

    orjson is several times faster than the standard library, which matters on the ingest and
    settlement paths; it refuses integers beyond 64 bits, which a raw usage report may carry in a
    field we ignore, so those documents take the slow path.
    """
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, default=_isoformat)


def _isoformat(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def newest_first(
    query: Select[T], id_column: InstrumentedAttribute[int], *, before: int | None, limit: int
) -> Select[T]:
    """One page of ``query`` by descending id, starting before the id ``before``."""
    query = query.order_by(id_column.desc()).limit(limit)
    return query if before is None else query.where(id_column < before)


def explain(session: Session, statement: ClauseElement) -> list[str]:
    """PostgreSQL's plan for ``statement`` (EXPLAIN, not run), one line per row; raises
    ValueError on another database."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        raise ValueError(f"EXPLAIN is read from PostgreSQL only, not {connection.dialect.name}")
    compiled = statement.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    rows = connection.exec_driver_sql(f"EXPLAIN {compiled.string}", compiled.params)
    return [str(line) for (line,) in rows]


def utcnow() -> dt.datetime:
    """The current time, aware, in UTC. Interfaces read the clock; domain code takes it."""
    return dt.datetime.now(dt.UTC)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys, WAL and a busy timeout. Statement
    parameters never appear in its errors or logs."""
    # A failed statement's message (logged with its traceback) would otherwise carry the bound
    # values: names, emails, key hashes (DESIGN invariant 7).
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    # Sessions in UTC: timestamps come back already in the zone we hand out.
    engine = create_engine(
        url, pool_pre_ping=True, connect_args={"options": "-c timezone=UTC"}, **kwargs
    )
    event.listen(engine, "handle_error", _hide_row_values)
    return engine


# PostgreSQL repeats the values of the row at fault in an error's DETAIL ("Key (email)=(...)
# already exists", "Failing row contains (...)"), which hide_parameters does not cover.
_DETAIL = re.compile(r"^DETAIL:.*$", re.MULTILINE)


def _hide_row_values(context: ExceptionContext) -> None:
    """Drop DETAIL from the text of a failed statement's errors; their ``diag`` keeps it."""
    for error in (context.original_exception, context.sqlalchemy_exception):
        if error is not None and error.args and isinstance(error.args[0], str):
            hidden = _DETAIL.sub("DETAIL:  [hidden: it repeats row values]", error.args[0])
            error.args = (hidden, *error.args[1:])


def make_read_engine(url: str) -> Engine:
    """An engine for the PostgreSQL replica at ``url`` whose transactions are all read-only.

    A hot standby refuses writes by itself; this makes the same hold when the URL names a
    primary by mistake, so nothing can ever be written through the report sessions.
    """
    engine = make_engine(url)

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET default_transaction_read_only = on")
        dbapi_connection.commit()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    with factory() as session, session.begin():
        yield session
