"""Reconciliation: proving on live data that every charge is right (DESIGN invariants 3 and 5).

A run checks that
- every account's balance equals the sum of its ledger entries (``billing.ledger.checkpoints``);
- every settled event's cost equals an independent recomputation: its usage normalised again from
  its raw report (and compared with the stored counts), the price version in effect at its
  ``occurred_at`` looked up again by its reported model name, priced exactly and rounded once;
- every usage entry equals minus the sum of the events charged to it.

By default a run verifies only what was settled since the watermark, the point before which a
clean run verified everything, so its cost follows the traffic since the last run, not the
history. ``full`` verifies the whole history; ``sample`` re-prices events drawn at random from it.

Invariants:
- The watermark moves only after a clean run, to :data:`CLOSE_AFTER` behind that run's clock:
  events and entries are stamped with their settlement's clock before it commits, and no
  settlement transaction lasts that long, so nothing can still appear before the watermark.
  Everything after it (the open part) is verified again by the next run.
- Settlement stamps a usage entry and the events charged to it with one instant
  (``settled_at`` = ``created_at``), so a window of time holds each entry with all its events:
  entries are checked against events one window at a time, through the indexes on those columns.
- A run reads one snapshot (``Runtime.snapshot``), so a batch committing meanwhile is seen whole
  or not at all.
- Events are read as plain rows, a page at a time; nothing is held for the whole run but the
  sums of the current window's entries.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from sqlalchemy import Row, Select, Text, cast, func, literal, select, tuple_
from sqlalchemy.orm import Session

from billing.catalog.pricing import price_usage
from billing.catalog.usage import InvalidUsage, TokenCounts, normalise_usage
from billing.core.money import Nanos
from billing.ledger import checkpoints
from billing.ledger.ledger import Drift, EntryKind, LedgerEntry
from billing.metering.settlement import PriceBook
from billing.metering.usage_events import EVENTS, EventStatus

# Longer than any settlement transaction (a batch commits within seconds), and than the clocks
# of the hosts that stamp events may disagree (`billing doctor` checks 5 s).
CLOSE_AFTER = dt.timedelta(minutes=10)
# Entries are checked against events a window at a time: the sums held are one window's.
WINDOW = dt.timedelta(days=1)
PAGE = 5000
# A random sample draws ids between the lowest and highest; a gap (an id never used, an event
# not settled) is drawn again, a bounded number of times.
SAMPLE_ROUNDS = 8


@dataclass(frozen=True)
class CostMismatch:
    """A charge (an event's, or a usage entry's) that differs from an independent recomputation."""

    subject: str
    charged_nanos: Nanos | None
    recomputed_nanos: Nanos | None

    def __str__(self) -> str:
        charged, recomputed = self.charged_nanos, self.recomputed_nanos
        return f"{self.subject}: charged {charged}, recomputed {recomputed} nano-USD"


@dataclass(frozen=True)
class TokenMismatch:
    """An event whose stored token counts are not what its raw usage report says."""

    request_id: str
    stored: TokenCounts | None
    reported: TokenCounts | None
    """None: the raw report no longer normalises (an invalid report)."""

    def __str__(self) -> str:
        return (
            f"event {self.request_id}: stored tokens {_show(self.stored)},"
            f" its raw usage says {_show(self.reported)}"
        )


def _show(counts: TokenCounts | None) -> str:
    if counts is None:
        return "(invalid)"
    return (
        f"(input {counts.input_tokens}, cached {counts.cached_tokens},"
        f" output {counts.output_tokens}, reasoning {counts.reasoning_tokens})"
    )


Mismatch = CostMismatch | TokenMismatch


@dataclass(frozen=True)
class CostCheck:
    """What re-pricing found, and how much it covered."""

    mismatches: list[Mismatch] = field(default_factory=list)
    events: int = 0
    """Settled events re-priced."""
    entries: int = 0
    """Usage entries checked against the events charged to them."""

    def __add__(self, other: CostCheck) -> CostCheck:
        return CostCheck(
            self.mismatches + other.mismatches,
            self.events + other.events,
            self.entries + other.entries,
        )


@dataclass(frozen=True)
class Verification:
    """One run's findings, and where the watermark may move if there are none."""

    watermark: dt.datetime | None
    """The watermark when the run began (None: no run was ever clean)."""
    since: dt.datetime | None
    """Where this run verified from: the watermark, or None for the whole history."""
    closed: dt.datetime
    """Where the watermark moves if the run is clean: CLOSE_AFTER behind its clock."""
    balances: list[Drift]
    costs: CostCheck
    sampled: CostCheck
    advanced: bool = False
    """Whether the watermark was moved to ``closed`` (set by the caller, after :func:`advance`)."""

    @property
    def drift(self) -> list[Drift | Mismatch]:
        """Everything found wrong; empty when the run is clean."""
        return [*self.balances, *self.costs.mismatches, *self.sampled.mismatches]

    @property
    def clean(self) -> bool:
        """Nothing found wrong."""
        return not self.drift


def verify(
    session: Session, *, now: dt.datetime, full: bool = False, sample: int = 0
) -> Verification:
    """Check balances, and charges settled since the watermark (every one with ``full``), and
    ``sample`` events drawn from the whole history. Reads only: see :func:`advance`."""
    watermark = checkpoints.verified_through(session)
    since = None if full else watermark
    return Verification(
        watermark=watermark,
        since=since,
        closed=now - CLOSE_AFTER,
        balances=checkpoints.balance_drift(session, since=since),
        costs=verify_costs(session, since=since, now=now),
        sampled=sample_costs(session, sample) if sample > 0 else CostCheck(),
    )


def advance(session: Session, verification: Verification, *, now: dt.datetime) -> bool:
    """Move the watermark to where a clean ``verification`` allows; False if it was not clean,
    the watermark would not move forward, or another run moved it first."""
    old, new = verification.watermark, verification.closed
    if not verification.clean:
        return False
    rebuild = verification.since is None
    if not rebuild and old is not None and new <= old:
        return False
    return checkpoints.advance(session, old=old, new=new, rebuild=rebuild, now=now)


def verify_costs(
    session: Session,
    *,
    since: dt.datetime | None = None,
    now: dt.datetime | None = None,
    page: int = PAGE,
) -> CostCheck:
    """Re-price every event settled from ``since`` on (None: ever), and check every usage entry
    created from then on against the events charged to it, a window of time at a time, reading
    ``page`` events at a time.

    ``now`` only sets where the windows end (the last one is open-ended); None: one window.
    """
    total = CostCheck()
    for start, end in _windows(session, since, now):
        total += _check_window(session, start, end, page)
    return total


def sample_costs(session: Session, size: int) -> CostCheck:
    """Re-price up to ``size`` settled events drawn at random from the whole history (fewer if
    there are not that many). Their usage entries are not checked: a sample holds only some of
    an entry's events."""
    columns = EVENTS.c
    low, high = session.execute(select(func.min(columns.id), func.max(columns.id))).one()
    if low is None:
        return CostCheck()
    rng = secrets.SystemRandom()
    chosen: dict[int, Row[Any]] = {}
    tried: set[int] = set()
    span = high - low + 1
    for _ in range(SAMPLE_ROUNDS):
        wanted = size - len(chosen)
        if wanted <= 0 or len(tried) >= span:
            break
        if span - len(tried) <= 2 * wanted:
            ids = set(range(low, high + 1)) - tried
        else:
            ids = {rng.randint(low, high) for _ in range(2 * wanted)} - tried
        tried |= ids
        found = [
            row
            for part in _chunks(sorted(ids), 1000)
            for row in session.execute(_settled().where(columns.id.in_(part)))
        ]
        for row in rng.sample(found, min(wanted, len(found))):
            chosen[row.id] = row
    mismatches = _reprice_all(session, list(chosen.values()))
    return CostCheck(mismatches, events=len(chosen))


class Settled(Protocol):
    """What re-pricing reads of a settled event (``usage_raw`` as stored: JSON text)."""

    @property
    def request_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def occurred_at(self) -> dt.datetime: ...
    @property
    def usage_raw(self) -> str | None: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def price_version_id(self) -> int | None: ...
    @property
    def cost_nanos(self) -> int | None: ...


def reprice(event: Settled, book: PriceBook) -> list[Mismatch]:
    """What is wrong with one settled event's stored counts, version and cost (empty: nothing).

    The counts are normalised again from the raw report when there is one; the version is the
    one in effect at ``occurred_at`` for the model the reported name resolves to now.
    """
    found: list[Mismatch] = []
    try:
        counts: TokenCounts | None = TokenCounts(
            event.input_tokens, event.cached_tokens, event.output_tokens, event.reasoning_tokens
        )
    except InvalidUsage:
        counts = None
    if event.usage_raw is not None:
        try:
            reported: TokenCounts | None = normalise_usage(_parse(event.usage_raw))
        except (InvalidUsage, ValueError):  # not a valid report (any more)
            reported = None
        if reported != counts:
            found.append(TokenMismatch(event.request_id, counts, reported))
        counts = reported
    version = book.version_at(event.model, event.occurred_at)
    recomputed = (
        None
        if version is None or counts is None
        else price_usage(counts, book.price(version)).total_nanos
    )
    if version is not None and version.id != event.price_version_id:
        subject = (
            f"event {event.request_id} (price version {event.price_version_id},"
            f" where {version.id} was in effect)"
        )
        found.append(CostMismatch(subject, event.cost_nanos, recomputed))
    elif recomputed is None or recomputed != event.cost_nanos:
        found.append(CostMismatch(f"event {event.request_id}", event.cost_nanos, recomputed))
    return found


def _parse(document: str) -> Any:
    """A stored JSON document, by orjson for speed; raises ValueError if it is not JSON.

    orjson refuses a number beyond a double, which the standard library reads (as infinity):
    a report holding one is judged by the standard library's reading.
    """
    try:
        return orjson.loads(document)
    except orjson.JSONDecodeError:
        return json.loads(document)


_COLUMNS = (
    "id",
    "request_id",
    "model",
    "occurred_at",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "price_version_id",
    "cost_nanos",
    "ledger_entry_id",
    "settled_at",
)


def _settled() -> Select[Any]:
    """Settled events as plain rows of ``_COLUMNS`` and the raw report as JSON text (parsed by
    :func:`_parse`, several times faster than the driver's)."""
    raw = cast(EVENTS.c.usage_raw, Text).label("usage_raw")
    return select(*(EVENTS.c[name] for name in _COLUMNS), raw).where(
        EVENTS.c.status == EventStatus.SETTLED
    )


def _reprice_all(session: Session, events: Sequence[Row[Any]]) -> list[Mismatch]:
    book = PriceBook(session, {event.model for event in events})
    return [mismatch for event in events for mismatch in reprice(event, book)]


def _check_window(
    session: Session, start: dt.datetime | None, end: dt.datetime | None, page_size: int
) -> CostCheck:
    """Re-price the events settled in [start, end) and check the usage entries created in it."""
    charged: dict[int, int] = defaultdict(int)
    mismatches: list[Mismatch] = []
    events = 0
    for page in _pages(session, start, end, page_size):
        mismatches += _reprice_all(session, page)
        for event in page:
            if event.ledger_entry_id is not None:
                charged[event.ledger_entry_id] += event.cost_nanos
        events += len(page)
    entries = _entries(session, start, end, charged_to=set(charged))
    for entry_id, amount in entries:
        total = charged.get(entry_id, 0)
        if -amount != total:
            mismatches.append(CostMismatch(f"ledger entry {entry_id}", -amount, total))
    return CostCheck(mismatches, events, len(entries))


def _pages(
    session: Session, start: dt.datetime | None, end: dt.datetime | None, size: int
) -> Iterator[Sequence[Row[Any]]]:
    """The events settled in [start, end), a page at a time, by (settled_at, id): each page is
    a range of the index on those columns, however many pages came before."""
    columns = EVENTS.c
    query = _settled().order_by(columns.settled_at, columns.id).limit(size)
    if start is not None:
        query = query.where(columns.settled_at >= start)
    if end is not None:
        query = query.where(columns.settled_at < end)
    page = session.execute(query).all()
    while page:
        yield page
        if len(page) < size:
            return
        last = page[-1]
        # Bound with the columns' types: timestamps are stored differently on SQLite.
        after = tuple_(columns.settled_at, columns.id) > tuple_(
            literal(last.settled_at, columns.settled_at.type), literal(last.id, columns.id.type)
        )
        page = session.execute(query.where(after)).all()


def _entries(
    session: Session, start: dt.datetime | None, end: dt.datetime | None, *, charged_to: set[int]
) -> list[tuple[int, int]]:
    """(id, amount) of the usage entries created in [start, end), and of any other entry the
    window's events are charged to (which, by settlement's stamping, there should be none of)."""
    created = LedgerEntry.kind == EntryKind.USAGE
    if start is not None:
        created &= LedgerEntry.created_at >= start
    if end is not None:
        created &= LedgerEntry.created_at < end
    rows = session.execute(select(LedgerEntry.id, LedgerEntry.amount_nanos).where(created)).all()
    entries = {entry_id: amount for entry_id, amount in rows}
    elsewhere = sorted(charged_to - set(entries))
    for part in _chunks(elsewhere, 1000):
        query = select(LedgerEntry.id, LedgerEntry.amount_nanos).where(LedgerEntry.id.in_(part))
        entries.update(session.execute(query).tuples().all())
    return sorted(entries.items())


def _windows(
    session: Session, since: dt.datetime | None, now: dt.datetime | None
) -> Iterator[tuple[dt.datetime | None, dt.datetime | None]]:
    """Consecutive windows [start, end) from ``since`` (None: from before anything) to
    open-ended, WINDOW long but for the first and the last."""
    first = since if since is not None else _first_stamp(session)
    if first is None or now is None:
        yield since, None
        return
    start, end = since, first + WINDOW
    while end <= now:
        yield start, end
        start, end = end, end + WINDOW
    yield start, None


def _first_stamp(session: Session) -> dt.datetime | None:
    """The earliest settlement stamp, of an event or a usage entry (each an index lookup)."""
    stamps = [
        session.scalar(
            select(func.min(EVENTS.c.settled_at)).where(EVENTS.c.status == EventStatus.SETTLED)
        ),
        session.scalar(
            select(func.min(LedgerEntry.created_at)).where(LedgerEntry.kind == EntryKind.USAGE)
        ),
    ]
    known = [stamp for stamp in stamps if stamp is not None]
    return min(known) if known else None


def _chunks(values: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
