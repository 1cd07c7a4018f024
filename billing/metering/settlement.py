"""Settlement: pricing pending usage events in batches and charging them to their accounts.

Invariants:
- An event is settled exactly once. A batch is claimed with ``FOR UPDATE SKIP LOCKED`` so that
  workers in parallel never take the same event, and everything a batch does (prices, ledger
  entries, balances, rollups, key states, the events' status) commits in one transaction: a
  worker killed mid-batch leaves the events pending for the next one.
- An event is priced at the price version in effect at its ``occurred_at``, and the version
  applied is stored with its exact breakdown. An event whose model has no price then is parked
  as unpriced, never dropped and never free; adding a price releases it.
- Balances move through the ledger only: one usage entry per account per batch, for the exact
  sum of the stored, rounded event costs. Accounts are charged in id order, so concurrent
  batches lock rows in the same order and cannot deadlock.
- Settling an event releases the hold its request placed at authorize time
  (``billing.ledger.holds``, ``billing.enforcement.hotpath``); the event is charged its full
  cost whatever the hold was.
"""

from __future__ import annotations

import bisect
import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session

from billing.accounts import rollups
from billing.catalog import catalog
from billing.catalog.catalog import PriceVersion
from billing.catalog.pricing import Cost, Price, price_usage
from billing.catalog.usage import TokenCounts
from billing.core.db import json_document
from billing.core.money import Nanos
from billing.ledger import ledger
from billing.metering.usage_events import EVENTS, EventStatus, UsageEvent

BATCH_SIZE = 2000


@dataclass(frozen=True)
class BatchResult:
    """What one settlement batch did."""

    claimed: int
    settled: int
    unpriced: int
    accounts_charged: int
    charged_nanos: Nanos


class PriceBook:
    """Every price version of the models a batch needs, looked up by model name and instant."""

    def __init__(self, session: Session, names: Iterable[str]) -> None:
        self._model_ids: dict[str, str | None] = {}
        for name in set(names):
            try:
                self._model_ids[name] = catalog.resolve_model(session, name)
            except catalog.ModelNotFound:
                self._model_ids[name] = None
        known = {model_id for model_id in self._model_ids.values() if model_id}
        self._versions: dict[str, list[PriceVersion]] = defaultdict(list)
        if known:
            query = select(PriceVersion).where(PriceVersion.model_id.in_(known))
            for version in session.scalars(query.order_by(PriceVersion.effective_from)):
                self._versions[version.model_id].append(version)
        self._starts = {
            model_id: [version.effective_from for version in versions]
            for model_id, versions in self._versions.items()
        }
        self._prices: dict[int, Price] = {}

    def model_id(self, name: str) -> str | None:
        """The canonical id of a reported model name, or None if it names no model."""
        return self._model_ids.get(name)

    def price(self, version: PriceVersion) -> Price:
        """The prices of ``version``, built once per batch."""
        if version.id not in self._prices:
            self._prices[version.id] = version.price
        return self._prices[version.id]

    def version_at(self, name: str, at: dt.datetime) -> PriceVersion | None:
        """The version in effect at ``at`` for the model ``name`` resolves to, or None."""
        model_id = self._model_ids.get(name)
        if model_id is None:
            return None
        position = bisect.bisect_right(self._starts.get(model_id, []), at)
        return self._versions[model_id][position - 1] if position else None


class Claimed(NamedTuple):
    """What settlement needs of a pending event (not its raw report)."""

    id: int
    request_id: str
    account_id: str
    key_id: str
    model: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    occurred_at: dt.datetime

    @property
    def counts(self) -> TokenCounts:
        return TokenCounts(
            self.input_tokens, self.cached_tokens, self.output_tokens, self.reasoning_tokens
        )


def claim(session: Session, limit: int) -> list[Claimed]:
    """Lock up to ``limit`` pending events, oldest first, skipping those another worker holds."""
    columns = EVENTS.c
    query = (
        select(*(columns[name] for name in Claimed._fields))
        .where(columns.status == EventStatus.PENDING)
        .order_by(columns.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [Claimed(*row) for row in session.execute(query).all()]


def settle_batch(
    session: Session, *, low_balance_nanos: Nanos, now: dt.datetime, limit: int = BATCH_SIZE
) -> BatchResult:
    """Claim, price and charge one batch of pending events; the caller commits. A balance
    falling to ``low_balance_nanos`` is announced (``billing.ledger.ledger.post_usage``)."""
    events = claim(session, limit)
    if not events:
        return BatchResult(0, 0, 0, 0, 0)
    book = PriceBook(session, (event.model for event in events))
    charges: dict[str, Nanos] = defaultdict(int)
    priced: list[tuple[Claimed, PriceVersion, Cost]] = []
    parked: list[Claimed] = []
    for event in events:
        version = book.version_at(event.model, event.occurred_at)
        if version is None:
            parked.append(event)
            continue
        cost = price_usage(event.counts, book.price(version))
        charges[event.account_id] += cost.total_nanos
        priced.append((event, version, cost))
    entries = ledger.write_usage_entries(session, charges, batch=uuid.uuid4().hex, now=now)
    rows: list[tuple[Any, ...]] = [
        (
            event.id,
            EventStatus.SETTLED.value,
            version.model_id,
            version.id,
            cost.total_nanos,
            cost.parts(),
            entries[event.account_id].id if cost.total_nanos else None,
        )
        for event, version, cost in priced
    ]
    rows += [
        (event.id, EventStatus.UNPRICED.value, book.model_id(event.model), None, None, None, None)
        for event in parked
    ]
    _write_outcomes(session, rows, settled_at=now)
    # Rows other batches also write come last, so their locks are held only until the commit.
    rollups.add(session, ((event, version.model_id, cost) for event, version, cost in priced))
    ledger.post_usage(
        session,
        entries.values(),
        settled=[(event.request_id, event.account_id) for event, _, _ in priced],
        low_balance_nanos=low_balance_nanos,
        now=now,
    )
    return BatchResult(len(events), len(priced), len(parked), len(entries), sum(charges.values()))


OUTCOME_COLUMNS = (
    "id",
    "status",
    "model_id",
    "price_version_id",
    "cost_nanos",
    "cost_breakdown",
    "ledger_entry_id",
)
# One statement for the whole batch: the outcomes travel as one JSON document, which
# PostgreSQL turns back into rows (far cheaper than a statement, or an array, per column).
_PG_OUTCOMES = text(
    """
    UPDATE usage_events AS e
    SET status = v.status, model_id = v.model_id, price_version_id = v.price_version_id,
        cost_nanos = v.cost_nanos, cost_breakdown = v.cost_breakdown,
        ledger_entry_id = v.ledger_entry_id,
        settled_at = CASE WHEN v.status = 'settled' THEN CAST(:settled_at AS timestamptz) END
    FROM json_to_recordset(CAST(:outcomes AS json)) AS v(
        id bigint, status varchar, model_id varchar, price_version_id bigint,
        cost_nanos bigint, cost_breakdown json, ledger_entry_id bigint
    )
    WHERE e.id = v.id
    """
)


def _write_outcomes(
    session: Session, rows: list[tuple[Any, ...]], *, settled_at: dt.datetime
) -> None:
    """Store each event's outcome (rows in ``OUTCOME_COLUMNS`` order), settled at ``settled_at``."""
    if session.get_bind().dialect.name == "postgresql":
        document = json_document([dict(zip(OUTCOME_COLUMNS, row, strict=True)) for row in rows])
        session.execute(_PG_OUTCOMES, {"outcomes": document, "settled_at": settled_at})
        return
    statement = (
        update(EVENTS)
        .where(EVENTS.c.id == bindparam("event_id"))
        .values({name: bindparam(name) for name in (*OUTCOME_COLUMNS[1:], "settled_at")})
    )
    names = ("event_id", *OUTCOME_COLUMNS[1:])
    values = [dict(zip(names, row, strict=True)) for row in rows]
    for value in values:
        value["settled_at"] = settled_at if value["status"] == EventStatus.SETTLED else None
    session.execute(statement, values)


def release_unpriced(session: Session) -> int:
    """Return every unpriced event to pending, to be priced again; how many were released.

    Called when a price or alias is added. Events whose model is still unpriced are parked
    again by the next batch.
    """
    result = session.execute(
        update(UsageEvent)
        .where(UsageEvent.status == EventStatus.UNPRICED)
        .values(status=EventStatus.PENDING)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class UnpricedModel:
    """A model name that usage was reported for and that has no price at the time of use."""

    model: str
    events: int
    first_occurred_at: dt.datetime
    last_occurred_at: dt.datetime


def unpriced_models(session: Session) -> list[UnpricedModel]:
    """Models with parked usage, most events first."""
    rows = session.execute(
        select(
            UsageEvent.model,
            func.count(),
            func.min(UsageEvent.occurred_at),
            func.max(UsageEvent.occurred_at),
        )
        .where(UsageEvent.status == EventStatus.UNPRICED)
        .group_by(UsageEvent.model)
        .order_by(func.count().desc(), UsageEvent.model)
    )
    return [UnpricedModel(model, count, first, last) for model, count, first, last in rows]


def settlement_lag(session: Session, *, now: dt.datetime) -> dt.timedelta | None:
    """How long ago the oldest usage event still waiting for settlement was received (None:
    nothing is pending). The lowest pending id rather than min(received_at) over a backlog that
    may be millions of rows: ids follow arrival, so the pending index answers this at once."""
    received = session.scalar(
        select(EVENTS.c.received_at)
        .where(EVENTS.c.status == EventStatus.PENDING)
        .order_by(EVENTS.c.id)
        .limit(1)
    )
    return None if received is None else max(now - received, dt.timedelta(0))
