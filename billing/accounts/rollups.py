"""Usage rollups: tokens by kind and cost per account, key, model and UTC day; and each key's
spend per UTC month.

Maintained by settlement in the transaction that settles the events, so a rollup and a month's
spend always equal the sums of their settled events. They live with the accounts because a key's
spend this month (:func:`month_spend`) is one of the facts its state derives from; it is one row
per key and month, so a cap check reads one row however long the history. Rows are upserted in
key order, rollups before spend, so concurrent batches cannot deadlock on them.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import BigInteger, Date, ForeignKey, Select, String, func, select
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
    # The primary key starts with the account, which serves one account's reports; reports over
    # all accounts read a period through this index instead of the whole table.
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True, index=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)


class KeyMonthSpend(Base):
    """Settled spend of one key in one UTC month (by the events' ``occurred_at``)."""

    __tablename__ = "key_month_spend"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    month: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    """The first day of the month."""
    spend_nanos: Mapped[int] = mapped_column(BigInteger)


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
    """Add settled events (with their model id and cost) to their rollups and to their keys'
    monthly spend."""
    totals: dict[tuple[str, str, str, dt.date], list[int]] = defaultdict(lambda: [0] * 6)
    spend: dict[tuple[str, dt.date], int] = defaultdict(int)
    for event, model_id, cost in priced:
        day = event.occurred_at.date()
        row = totals[(event.account_id, event.key_id, model_id, day)]
        row[0] += 1
        row[1] += event.input_tokens
        row[2] += event.cached_tokens
        row[3] += event.output_tokens
        row[4] += event.reasoning_tokens
        row[5] += cost.total_nanos
        spend[(event.key_id, day.replace(day=1))] += cost.total_nanos
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
    charged = [
        {"key_id": key_id, "month": month, "spend_nanos": amount}
        for (key_id, month), amount in sorted(spend.items())
        if amount
    ]
    if charged:
        upsert = dialect.insert(KeyMonthSpend)
        session.execute(
            upsert.on_conflict_do_update(
                index_elements=["key_id", "month"],
                set_={"spend_nanos": KeyMonthSpend.spend_nanos + upsert.excluded.spend_nanos},
            ),
            charged,
        )


def month_start(now: dt.datetime) -> dt.date:
    """The first day of ``now``'s UTC month."""
    return now.astimezone(dt.UTC).date().replace(day=1)


def month_key(now: dt.datetime) -> str:
    """The UTC month of ``now`` as ``YYYY-MM``."""
    utc = now.astimezone(dt.UTC)
    return f"{utc.year:04d}-{utc.month:02d}"  # what strftime("%Y-%m") says, at a tenth the cost


def month_spend(session: Session, key_ids: Sequence[str], *, now: dt.datetime) -> dict[str, Nanos]:
    """Settled spend of each key in the current UTC month (keys with none are left out)."""
    if not key_ids:
        return {}
    return {
        key_id: spend for key_id, spend in session.execute(month_spend_statement(key_ids, now=now))
    }


def month_spend_statement(key_ids: Sequence[str], *, now: dt.datetime) -> Select[str, int]:
    """The query of :func:`month_spend`: one primary-key lookup per key."""
    return select(KeyMonthSpend.key_id, KeyMonthSpend.spend_nanos).where(
        KeyMonthSpend.key_id.in_(key_ids), KeyMonthSpend.month == month_start(now)
    )


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
    # PostgreSQL sums bigints as numeric: back to exact ints.
    return [
        {name: int(value) if name in COUNTERS else value for name, value in row._mapping.items()}
        for row in session.execute(report_statement(query))
    ]


def report_statement(query: UsageQuery) -> Select[Any]:
    """The query of :func:`report`; raises InvalidRequest for a bad group or range."""
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
    return statement.group_by(*columns).order_by(*columns)
