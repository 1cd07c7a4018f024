"""Usage rollups: tokens by kind and cost per account, key, model and UTC day.

Maintained by settlement in the transaction that settles the events, so a rollup always equals
the sum of its settled events. They live with the accounts because a key's spend this month
(:func:`month_spend`) is one of the facts its state derives from. Rows are upserted in key order
so concurrent batches cannot deadlock on them.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import BigInteger, Date, ForeignKey, String, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.core.db import Base
from billing.core.errors import InvalidRequest
from billing.core.money import Nanos

if TYPE_CHECKING:
    from billing.catalog.pricing import Cost

COUNTERS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_nanos",
)
GROUPS = {"day": "day", "model": "model_id", "key": "key_id", "account": "account_id"}


class UsageRollup(Base):
    """Settled usage of one key on one model on one UTC day."""

    __tablename__ = "usage_rollups"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)


class SettledUsage(Protocol):
    """What a rollup needs of a settled event."""

    @property
    def account_id(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def occurred_at(self) -> dt.datetime: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...


def add(session: Session, priced: Iterable[tuple[SettledUsage, str, Cost]]) -> None:
    """Add settled events (with their model id and cost) to their rollups."""
    totals: dict[tuple[str, str, str, dt.date], list[int]] = defaultdict(lambda: [0] * 6)
    for event, model_id, cost in priced:
        row = totals[(event.account_id, event.key_id, model_id, event.occurred_at.date())]
        row[0] += 1
        row[1] += event.input_tokens
        row[2] += event.cached_tokens
        row[3] += event.output_tokens
        row[4] += event.reasoning_tokens
        row[5] += cost.total_nanos
    if not totals:
        return
    values = [
        {
            "account_id": a,
            "key_id": k,
            "model_id": m,
            "day": d,
            **dict(zip(COUNTERS, counters, strict=True)),
        }
        for (a, k, m, d), counters in sorted(totals.items())
    ]
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(UsageRollup)
    table = UsageRollup.__table__
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["account_id", "key_id", "model_id", "day"],
            set_={name: table.c[name] + statement.excluded[name] for name in COUNTERS},
        ),
        values,
    )


def month_start(now: dt.datetime) -> dt.date:
    """The first day of ``now``'s UTC month."""
    return now.astimezone(dt.UTC).date().replace(day=1)


def month_key(now: dt.datetime) -> str:
    """The UTC month of ``now`` as ``YYYY-MM``."""
    utc = now.astimezone(dt.UTC)
    return f"{utc.year:04d}-{utc.month:02d}"  # what strftime("%Y-%m") says, at a tenth the cost


def month_spend(session: Session, key_ids: Sequence[str], *, now: dt.datetime) -> dict[str, Nanos]:
    """Settled spend of each key in the current UTC month."""
    if not key_ids:
        return {}
    rows = session.execute(
        select(UsageRollup.key_id, func.sum(UsageRollup.cost_nanos))
        .where(UsageRollup.key_id.in_(key_ids), UsageRollup.day >= month_start(now))
        .group_by(UsageRollup.key_id)
    )
    return {key_id: int(total) for key_id, total in rows}


@dataclass(frozen=True)
class UsageQuery:
    """Filters and grouping of a usage report; dates are UTC days, both ends included."""

    account_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    start: dt.date | None = None
    end: dt.date | None = None
    group_by: tuple[str, ...] = ("day",)


def report(session: Session, query: UsageQuery) -> list[dict[str, Any]]:
    """Usage totals per group, ordered by the groups; raises InvalidRequest for a bad group."""
    if not query.group_by:  # else the sums of no rows are NULL, and int(None) fails
        raise InvalidRequest(
            f"group_by must name at least one of {', '.join(GROUPS)}.", param="group_by"
        )
    unknown = [name for name in query.group_by if name not in GROUPS]
    if unknown:
        raise InvalidRequest(
            f"group_by {unknown[0]!r} is not one of {', '.join(GROUPS)}.", param="group_by"
        )
    if query.start and query.end and query.start > query.end:
        raise InvalidRequest("from must not be after to.", param="from")
    columns = [getattr(UsageRollup, GROUPS[name]).label(name) for name in query.group_by]
    sums = [func.sum(getattr(UsageRollup, name)).label(name) for name in COUNTERS]
    statement = select(*columns, *sums)
    for column, value in (
        (UsageRollup.account_id, query.account_id),
        (UsageRollup.key_id, query.key_id),
        (UsageRollup.model_id, query.model),
    ):
        if value is not None:
            statement = statement.where(column == value)
    if query.start:
        statement = statement.where(UsageRollup.day >= query.start)
    if query.end:
        statement = statement.where(UsageRollup.day <= query.end)
    statement = statement.group_by(*columns).order_by(*columns)
    # PostgreSQL sums bigints as numeric: back to exact ints.
    return [
        {name: int(value) if name in COUNTERS else value for name, value in row._mapping.items()}
        for row in session.execute(statement)
    ]
