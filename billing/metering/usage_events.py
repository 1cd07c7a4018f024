"""Usage events: durable ingest of what the gateway reports (DESIGN sections 4 and 6.2).

Invariants:
- An event answered "accepted" is committed before the answer (the caller commits before it
  replies 202) and is never lost: settlement only ever changes its status, never deletes it.
- ``request_id`` is the idempotency key (a unique index). A repeat with the same content is a
  duplicate; the same request id with other content is refused as a conflict. Content is
  compared as resolved, not as spelled: the key (by secret or id), the model a name resolves to
  (an alias or a dated snapshot is its model), ``occurred_at`` as an instant (any offset), the
  normalised counts (either usage shape) and the outcome. A retry that omits ``occurred_at``, as
  the original did, is the same event.
- Every item of a report whose request id is already stored is judged against the stored event;
  items whose request id is new are judged against the first of them, which is stored. So each
  answer is the same whatever the order of the items.
- A request id whose open authorize hold belongs to another key is refused as a conflict.
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
from billing.catalog import catalog
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
        # Reconciliation re-prices what was settled in a window, in this order
        # (billing.metering.reconcile).
        Index(
            "ix_usage_events_settled",
            "settled_at",
            "id",
            postgresql_where=text("status = 'settled'"),
            sqlite_where=text("status = 'settled'"),
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


def _content_hash(draft: Draft, key_id: str, model: str) -> str:
    """What the gateway reported, canonically, with the model named ``model``: equal for a
    retry, different for other content. Only the model is left as spelled (the stored hashes
    have it so); :class:`_ModelNames` compares models as resolved."""
    occurred = draft.occurred_at.isoformat() if draft.occurred_at else None
    counts = draft.counts
    content = (
        key_id,
        model,
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
    # The items of each request id, in order: the first is the one that may be stored.
    groups: dict[str, list[_Owned]] = {}
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
        groups.setdefault(draft.request_id, []).append(_Owned(draft, key_id, account_id))
    rows = {request_id: _row(group[0], now) for request_id, group in groups.items()}
    inserted = _insert_new(session, list(rows.values()), now=now) if rows else set()
    result.accepted += len(inserted)
    if inserted:
        mark_usage_pending(session)
    stored = _stored(session, [request_id for request_id in groups if request_id not in inserted])
    models = _ModelNames(session)
    for request_id, group in groups.items():
        if request_id in inserted:
            reference, repeats = (group[0].draft.model, rows[request_id]["content_hash"]), group[1:]
        else:
            reference, repeats = stored[request_id], group
        for item in repeats:
            _judge_repeat(result, item, reference, models, prefix_items)
    result.rejected.sort(key=lambda rejection: rejection.index)
    return result


@dataclass(frozen=True)
class _Owned:
    """A parsed item with the key it names resolved."""

    draft: Draft
    key_id: str
    account_id: str


def _row(item: _Owned, now: dt.datetime) -> dict[str, Any]:
    """The usage_events row of ``item``, received ``now``."""
    draft = item.draft
    return {
        "request_id": draft.request_id,
        "content_hash": _content_hash(draft, item.key_id, draft.model),
        "account_id": item.account_id,
        "key_id": item.key_id,
        "model": draft.model,
        "usage_raw": draft.usage_raw,
        "input_tokens": draft.counts.input_tokens,
        "cached_tokens": draft.counts.cached_tokens,
        "output_tokens": draft.counts.output_tokens,
        "reasoning_tokens": draft.counts.reasoning_tokens,
        "outcome": draft.outcome.value,
        "occurred_at": draft.occurred_at or now,
    }


def _stored(session: Session, request_ids: list[str]) -> dict[str, tuple[str, str]]:
    """(model as spelled, content hash) of the stored events of ``request_ids``."""
    if not request_ids:
        return {}
    query = select(UsageEvent.request_id, UsageEvent.model, UsageEvent.content_hash).where(
        UsageEvent.request_id.in_(request_ids)
    )
    return {request_id: (model, content) for request_id, model, content in session.execute(query)}


class _ModelNames:
    """Reported model names compared by the model they resolve to, each resolved once per report
    and only when two spellings differ. A name that resolves to no model stands for itself."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._ids: dict[str, str] = {}

    def same(self, first: str, second: str) -> bool:
        """True if both names are the same model."""
        return first == second or self._resolved(first) == self._resolved(second)

    def _resolved(self, name: str) -> str:
        if name not in self._ids:
            try:
                self._ids[name] = catalog.resolve_model(self._session, name)
            except catalog.ModelNotFound:
                self._ids[name] = name
        return self._ids[name]


def _judge_repeat(
    result: IngestResult,
    item: _Owned,
    reference: tuple[str, str],
    models: _ModelNames,
    prefix_items: bool,
) -> None:
    """An item whose request id is taken by ``reference`` (the stored event's model as spelled
    and content hash): a duplicate if its content is the same once resolved, else a conflict."""
    model, content_hash = reference
    draft = item.draft
    if models.same(draft.model, model) and _content_hash(draft, item.key_id, model) == content_hash:
        result.duplicates += 1
        return
    param = f"events[{draft.index}].request_id" if prefix_items else "request_id"
    error = RequestIdConflict(
        f"{param} {draft.request_id!r} was already reported with different content.", param=param
    )
    result.rejected.append(Rejection(draft.index, draft.request_id, error))


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
