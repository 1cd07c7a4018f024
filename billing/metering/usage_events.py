"""Usage events: durable ingest of what the gateway reports (DESIGN sections 4 and 6.2).

Invariants:
- An event answered "accepted" is committed before the answer (the caller commits before it
  replies 202) and is never lost: settlement only ever changes its status, never deletes it.
- ``request_id`` is the idempotency key (a unique index). A repeat with the same content is a
  duplicate; the same request id with other content is refused as a conflict. Content is what
  the gateway reported, so a retry that omits ``occurred_at`` is still the same event. A
  request id whose open authorize hold belongs to another key is refused as a conflict too.
- One bad item never sinks the good ones of its batch: each is judged on its own.
- Usage of a known key is accepted whatever the key's state now: the tokens were spent upstream
  (a key revoked after its request began is still charged).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from cachetools import LRUCache
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Index,
    Integer,
    String,
    Table,
    select,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.schema import ForeignKey

from billing.accounts.keys import ApiKey
from billing.catalog.usage import TokenCounts
from billing.core.db import Base, BigIntId, json_document
from billing.core.effects import mark_usage_pending
from billing.core.errors import BillingError, NotFound
from billing.core.ids import keyed_hash
from billing.metering.report_items import Draft, parse_item

MAX_BATCH = 1000


class EventStatus(enum.StrEnum):
    """Where an event is in settlement."""

    PENDING = "pending"
    SETTLED = "settled"
    UNPRICED = "unpriced"


class UsageEvent(Base):
    """One request's usage, as reported, and once settled its price and ledger entry."""

    __tablename__ = "usage_events"
    __table_args__ = (
        CheckConstraint(
            "input_tokens >= 0 AND cached_tokens >= 0 AND output_tokens >= 0"
            " AND reasoning_tokens >= 0 AND cached_tokens <= input_tokens"
            " AND reasoning_tokens <= output_tokens",
            name="token_subsets",
        ),
        CheckConstraint("status IN ('pending', 'settled', 'unpriced')", name="status_known"),
        CheckConstraint(
            "(status = 'settled') = (cost_nanos IS NOT NULL AND price_version_id IS NOT NULL"
            " AND settled_at IS NOT NULL)",
            name="settled_has_price",
        ),
        CheckConstraint(
            "cost_nanos IS NULL OR cost_nanos = 0 OR ledger_entry_id IS NOT NULL",
            name="charged_has_entry",
        ),
        Index(
            "ix_usage_events_pending",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index(
            "ix_usage_events_unpriced",
            "model",
            postgresql_where=text("status = 'unpriced'"),
            sqlite_where=text("status = 'unpriced'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(200), unique=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(128))
    usage_raw: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(24))
    occurred_at: Mapped[dt.datetime]
    received_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(String(12), default=EventStatus.PENDING)
    model_id: Mapped[str | None] = mapped_column(String(128))
    price_version_id: Mapped[int | None] = mapped_column(ForeignKey("price_versions.id"))
    cost_nanos: Mapped[int | None] = mapped_column(BigInteger)
    cost_breakdown: Mapped[dict[str, int] | None] = mapped_column(JSON)
    ledger_entry_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), ForeignKey("ledger_entries.id")
    )
    settled_at: Mapped[dt.datetime | None]

    @property
    def counts(self) -> TokenCounts:
        """The normalised token counts."""
        return TokenCounts(
            self.input_tokens, self.cached_tokens, self.output_tokens, self.reasoning_tokens
        )


EVENTS = cast(Table, UsageEvent.__table__)


class UnknownKey(BillingError):
    """The event names a key we do not know."""

    status = 400
    code = "invalid_api_key"


class EventNotFound(NotFound):
    """No event has that request id."""


def get_event(session: Session, request_id: str) -> UsageEvent:
    """The event reported with ``request_id``; raises EventNotFound."""
    event = session.scalars(select(UsageEvent).where(UsageEvent.request_id == request_id)).first()
    if event is None:
        raise EventNotFound(f"No usage event has request_id {request_id!r}.", param="request_id")
    return event


class RequestIdConflict(BillingError):
    """The request id was already used for an event with other content."""

    status = 409
    code = "request_id_conflict"


@dataclass(frozen=True)
class Rejection:
    """One item refused, with the error the gateway can act on."""

    index: int
    request_id: str | None
    error: BillingError


@dataclass
class IngestResult:
    """What became of each item of a report."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)


def _content_hash(draft: Draft, key_id: str) -> str:
    """What the gateway reported, canonically: equal for a retry, different for other content."""
    occurred = draft.occurred_at.isoformat() if draft.occurred_at else None
    counts = draft.counts
    content = (
        key_id,
        draft.model,
        counts.input_tokens,
        counts.cached_tokens,
        counts.output_tokens,
        counts.reasoning_tokens,
        occurred,
        draft.outcome.value,
    )
    # The repr of a tuple of str, int and None is canonical and much cheaper than JSON.
    return hashlib.sha256(repr(content).encode()).hexdigest()


def ingest(
    session: Session,
    items: Sequence[Any],
    *,
    prefix_items: bool,
    hmac_key: bytes,
    max_age: dt.timedelta,
    now: dt.datetime,
    hold_keys: Callable[[list[str]], Mapping[str, str]] | None = None,
) -> IngestResult:
    """Validate and durably store reported events; the caller commits before answering.

    ``prefix_items`` names fields as ``events[i].field`` (a batch) rather than ``field``; an
    ``occurred_at`` older than ``max_age`` is refused; ``hold_keys`` gives the key of each
    request id that has an open authorize hold.
    """
    result = IngestResult()
    drafts: list[Draft] = []
    for index, item in enumerate(items):
        prefix = f"events[{index}]." if prefix_items else ""
        try:
            drafts.append(parse_item(index, item, prefix, max_age=max_age, now=now))
        except BillingError as error:
            request_id = item.get("request_id") if isinstance(item, Mapping) else None
            result.rejected.append(
                Rejection(index, request_id if isinstance(request_id, str) else None, error)
            )
    owners = _resolve_keys(session, drafts, hmac_key)
    holders = hold_keys([draft.request_id for draft in drafts]) if hold_keys and drafts else {}
    rows: dict[str, dict[str, Any]] = {}
    indexes: dict[str, int] = {}
    for draft in drafts:
        owner = owners.get(draft.key_secret or draft.key_id or "")
        if owner is None:
            which = "api_key" if draft.key_secret else "key_id"
            prefix = f"events[{draft.index}]." if prefix_items else ""
            unknown = UnknownKey(f"{prefix}{which} names no key.", param=prefix + which)
            result.rejected.append(Rejection(draft.index, draft.request_id, unknown))
            continue
        key_id, account_id = owner
        if holders.get(draft.request_id, key_id) != key_id:
            param = f"events[{draft.index}].request_id" if prefix_items else "request_id"
            held = RequestIdConflict(
                f"{param} {draft.request_id!r} is held by another key's authorize; request"
                " ids are minted by the gateway, one per upstream request.",
                param=param,
            )
            result.rejected.append(Rejection(draft.index, draft.request_id, held))
            continue
        content_hash = _content_hash(draft, key_id)
        earlier = rows.get(draft.request_id)
        if earlier is not None:
            _judge_repeat(
                result,
                draft.index,
                draft.request_id,
                earlier["content_hash"],
                content_hash,
                prefix_items,
            )
            continue
        indexes[draft.request_id] = draft.index
        rows[draft.request_id] = {
            "request_id": draft.request_id,
            "content_hash": content_hash,
            "account_id": account_id,
            "key_id": key_id,
            "model": draft.model,
            "usage_raw": draft.usage_raw,
            "input_tokens": draft.counts.input_tokens,
            "cached_tokens": draft.counts.cached_tokens,
            "output_tokens": draft.counts.output_tokens,
            "reasoning_tokens": draft.counts.reasoning_tokens,
            "outcome": draft.outcome.value,
            "occurred_at": draft.occurred_at or now,
        }
    if rows:
        inserted = _insert_new(session, list(rows.values()), now=now)
        repeats = [request_id for request_id in rows if request_id not in inserted]
        result.accepted += len(inserted)
        if inserted:
            mark_usage_pending(session)
        if repeats:
            # Rows unpack as (request_id, content_hash); Result.tuples() is deprecated in 2.1.
            stored: dict[str, str] = {
                request_id: content_hash
                for request_id, content_hash in session.execute(
                    select(UsageEvent.request_id, UsageEvent.content_hash).where(
                        UsageEvent.request_id.in_(repeats)
                    )
                )
            }
            for request_id in repeats:
                new = rows[request_id]["content_hash"]
                _judge_repeat(
                    result, indexes[request_id], request_id, stored[request_id], new, prefix_items
                )
    result.rejected.sort(key=lambda rejection: rejection.index)
    return result


def _judge_repeat(
    result: IngestResult, index: int, request_id: str, stored: str, new: str, prefix_items: bool
) -> None:
    """A request id seen before: a duplicate if the content is the same, else a conflict."""
    if stored == new:
        result.duplicates += 1
        return
    param = f"events[{index}].request_id" if prefix_items else "request_id"
    error = RequestIdConflict(
        f"{param} {request_id!r} was already reported with different content.", param=param
    )
    result.rejected.append(Rejection(index, request_id, error))


# A key never changes account, so the account of a key id, once read, is known for good (a
# secret is not: rotation retires it). Bounded: the least recently used go first. Request
# threads share it, hence the lock.
_ACCOUNT_OF_KEY: LRUCache[str, str] = LRUCache(maxsize=100_000)
_ACCOUNT_OF_KEY_LOCK = threading.Lock()


def _resolve_keys(
    session: Session, drafts: list[Draft], hmac_key: bytes
) -> dict[str, tuple[str, str]]:
    """(key id, account id) by the secret or key id each draft named, in one query at most."""
    secrets = {draft.key_secret for draft in drafts if draft.key_secret}
    by_hash = {keyed_hash(hmac_key, secret): secret for secret in secrets}
    ids = {draft.key_id for draft in drafts if draft.key_id}
    with _ACCOUNT_OF_KEY_LOCK:
        known = {key_id: _ACCOUNT_OF_KEY.get(key_id) for key_id in ids}
    owners = {key_id: (key_id, account) for key_id, account in known.items() if account is not None}
    unknown = ids.difference(owners)
    if not by_hash and not unknown:
        return owners
    rows = session.execute(
        select(ApiKey.id, ApiKey.account_id, ApiKey.key_hash).where(
            ApiKey.key_hash.in_(by_hash) | ApiKey.id.in_(unknown)
        )
    )
    learned = {}
    for key_id, account_id, key_hash in rows:
        if key_hash in by_hash:
            owners[by_hash[key_hash]] = (key_id, account_id)
        if key_id in ids:
            owners[key_id] = (key_id, account_id)
            learned[key_id] = account_id
    with _ACCOUNT_OF_KEY_LOCK:
        _ACCOUNT_OF_KEY.update(learned)
    return owners


# New events in one statement: the rows travel as one JSON document that PostgreSQL turns back
# into rows (psycopg would otherwise parse a statement with a placeholder per value).
_PG_INSERT = text(
    """
    INSERT INTO usage_events (request_id, content_hash, account_id, key_id, model, usage_raw,
        input_tokens, cached_tokens, output_tokens, reasoning_tokens, outcome, occurred_at,
        received_at, status)
    SELECT request_id, content_hash, account_id, key_id, model, usage_raw, input_tokens,
        cached_tokens, output_tokens, reasoning_tokens, outcome, occurred_at,
        CAST(:received_at AS timestamptz), 'pending'
    FROM json_to_recordset(CAST(:rows AS json)) AS r(
        request_id varchar, content_hash varchar, account_id varchar, key_id varchar,
        model varchar, usage_raw json, input_tokens bigint, cached_tokens bigint,
        output_tokens bigint, reasoning_tokens bigint, outcome varchar, occurred_at timestamptz
    )
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id
    """
)


def _insert_new(session: Session, rows: list[dict[str, Any]], *, now: dt.datetime) -> set[str]:
    """Insert rows whose request id is new, received ``now``; returns the request ids inserted."""
    if session.get_bind().dialect.name == "postgresql":
        document = json_document(rows)
        return set(session.scalars(_PG_INSERT, {"rows": document, "received_at": now}))
    statement = (
        sqlite.insert(EVENTS)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(EVENTS.c.request_id)
        .values(received_at=now, status=EventStatus.PENDING)
    )
    return set(session.scalars(statement, rows))
