"""Holds: the worst-case cost of a request in flight, reserved against the account's balance.

Placed at authorize time, released when the request's usage is settled (same request id), when
the gateway releases them, or when they expire. This module keeps the holds placed through
PostgreSQL (the embedded default, and the fallback when Redis is down);
``billing.enforcement.hotpath`` keeps those placed through Redis.

Invariants:
- A hold is placed only if it fits the available balance (balance minus open holds), decided
  under the account row's lock; when the whole request does not fit, the hold is clipped to the
  most output tokens that do (``HoldTerms.grant``), or refused.
- One hold per request id (a unique index); the hold keeps the key and a hash of the request's
  parameters, so that a repeat is told from a different request under the same id.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence

from sqlalchemy import BigInteger, ColumnElement, ForeignKey, Index, String, select, text, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.accounts.accounts import Account
from billing.accounts.keys import ApiKey
from billing.catalog.pricing import HoldTerms
from billing.core.db import Base
from billing.core.effects import mark_requests_settled
from billing.core.errors import NotFound
from billing.core.money import Nanos


class Hold(Base):
    """A reservation of ``amount_nanos`` for one request, open until released or expired."""

    __tablename__ = "holds"
    __table_args__ = (
        Index(
            "ix_holds_open_expires_at",
            "expires_at",
            postgresql_where=text("released_at IS NULL"),
            sqlite_where=text("released_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(200), unique=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model_id: Mapped[str] = mapped_column(String(200))
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    # The output tokens the hold covers (clipped or not), and a hash of the authorize request's
    # parameters; null on holds placed before either was kept.
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    released_at: Mapped[dt.datetime | None]
    release_reason: Mapped[str | None] = mapped_column(String(40))


def find(session: Session, request_id: str) -> Hold | None:
    """The hold placed for ``request_id``, open or not."""
    return session.scalars(select(Hold).where(Hold.request_id == request_id)).first()


def place(
    session: Session,
    *,
    key: ApiKey,
    hold_id: str,
    model_id: str,
    request_id: str,
    request_hash: str,
    terms: HoldTerms,
    month_spend: Nanos,
    ttl: dt.timedelta,
    now: dt.datetime,
) -> tuple[Hold, Nanos]:
    """Reserve the hold of ``terms`` for ``request_id`` as hold ``hold_id``, clipped if the
    whole request does not fit; returns the hold and the available balance left. Raises
    DoesNotFit if not even the smallest grant fits the available balance, and QuotaExceeded if
    the hold does not fit the key's monthly cap (``month_spend`` is the key's settled spend
    this month).

    Each test-and-reserve is a conditional UPDATE, which PostgreSQL evaluates on the row's
    latest version under its row lock (and SQLite under its write lock), so concurrent holds
    can never together exceed the balance; when the whole request does not fit, the row is
    locked first and the clipped hold computed from what it holds. The caller rolls its
    transaction back on a refusal, and answers a repeated request id before calling this.
    """
    output_tokens, amount = terms.output_tokens, terms.full_amount
    available = _reserve(session, key.account_id, amount)
    if available is None:
        balance, held = session.execute(
            # A write that changes nothing, for the row lock (FOR UPDATE is not SQLite's).
            update(Account)
            .where(Account.id == key.account_id)
            .values(held_nanos=Account.held_nanos)
            .returning(Account.balance_nanos, Account.held_nanos)
            .execution_options(synchronize_session=False)
        ).one()
        granted = terms.grant(balance - held) if balance > 0 else None
        if granted is None:
            raise DoesNotFit(balance, balance - held)
        output_tokens, amount = granted
        available = _reserve(session, key.account_id, amount)
        assert available is not None, "the row is locked: what fitted still fits"
    if key.monthly_cap_nanos is not None:
        fits = session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key.id,
                ApiKey.held_nanos + amount + month_spend <= ApiKey.monthly_cap_nanos,
            )
            .values(held_nanos=ApiKey.held_nanos + amount)
            .execution_options(synchronize_session=False)
        )
        if fits.rowcount == 0:  # type: ignore[attr-defined]
            raise QuotaExceeded
    hold = Hold(
        id=hold_id,
        request_id=request_id,
        account_id=key.account_id,
        key_id=key.id,
        model_id=model_id,
        amount_nanos=amount,
        output_tokens=output_tokens,
        request_hash=request_hash,
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(hold)
    session.flush()
    return hold, available


def _reserve(session: Session, account_id: str, amount: Nanos) -> Nanos | None:
    """Add ``amount`` to the account's held amount if it fits what is available; returns the
    available balance left, or None (nothing changed) if it does not fit."""
    available = session.execute(
        update(Account)
        .where(
            Account.id == account_id,
            Account.balance_nanos > 0,
            Account.available_nanos > 0,
            Account.available_nanos >= amount,
        )
        .values(held_nanos=Account.held_nanos + amount)
        .returning(Account.available_nanos)
        .execution_options(synchronize_session=False)
    ).scalar()
    return None if available is None else int(available)


class DoesNotFit(Exception):
    """Not even the smallest hold the request accepts fits the available balance."""

    def __init__(self, balance_nanos: Nanos, available_nanos: Nanos) -> None:
        super().__init__(available_nanos)
        self.balance_nanos = balance_nanos
        self.available_nanos = available_nanos


class QuotaExceeded(Exception):
    """The hold would take the key past its monthly cap."""


def release(session: Session, request_ids: Sequence[str], *, reason: str, now: dt.datetime) -> int:
    """Release the open holds of these requests; returns how many were open."""
    if not request_ids:
        return 0
    return _release(session, Hold.request_id.in_(request_ids), reason=reason, now=now)


class HoldStatus(enum.StrEnum):
    """What became of a hold, as the gateway's release route answers it."""

    RELEASED = "released"
    SETTLED = "settled"
    EXPIRED = "expired"


def status_of(reason: str | None) -> HoldStatus:
    """The status of a closed hold from its ``release_reason``."""
    if reason in (HoldStatus.SETTLED, HoldStatus.EXPIRED):
        return HoldStatus(reason)
    return HoldStatus.RELEASED


class HoldNotFound(NotFound):
    """No hold has that id."""

    code = "hold_not_found"


def release_hold(session: Session, hold_id: str, *, now: dt.datetime) -> tuple[HoldStatus, Nanos]:
    """Release the hold ``hold_id`` if it is open; returns its status now and the amount this
    call released (0 when it was already closed). Raises HoldNotFound."""
    hold = session.get(Hold, hold_id)
    if hold is None:
        raise HoldNotFound(f"No hold with id {hold_id!r}.", param="hold_id")
    if _release(session, Hold.id == hold_id, reason=HoldStatus.RELEASED, now=now):
        return HoldStatus.RELEASED, hold.amount_nanos
    session.refresh(hold)
    return status_of(hold.release_reason), 0


_ANY_OPEN = select(Hold.id).where(Hold.released_at.is_(None)).limit(1)


def open_hold_keys(session: Session, request_ids: Sequence[str]) -> dict[str, str]:
    """The key of each of these requests that has an open hold placed through PostgreSQL."""
    # With Redis up there are none: one probe of the small index of open holds answers that,
    # instead of a lookup per request id of every usage batch.
    if not request_ids or session.scalar(_ANY_OPEN) is None:
        return {}
    rows = session.execute(
        select(Hold.request_id, Hold.key_id).where(
            Hold.request_id.in_(request_ids), Hold.released_at.is_(None)
        )
    )
    return {request_id: key_id for request_id, key_id in rows}


def release_settled(
    session: Session, settled: Sequence[tuple[str, str]], *, now: dt.datetime
) -> None:
    """Release the holds of these settled requests (request id, account id): those placed
    through PostgreSQL now, those placed through Redis after the commit (with the balances the
    settlement produced)."""
    request_ids = [request_id for request_id, _ in settled]
    if open_holds(session, {account_id for _, account_id in settled}):
        release(session, request_ids, reason="settled", now=now)
    mark_requests_settled(session, request_ids)


def expire(session: Session, *, now: dt.datetime) -> int:
    """Release every open hold past its expiry; returns how many."""
    return _release(session, Hold.expires_at <= now, reason="expired", now=now)


def _release(session: Session, which: ColumnElement[bool], *, reason: str, now: dt.datetime) -> int:
    released = session.execute(
        update(Hold)
        .where(which, Hold.released_at.is_(None))
        .values(released_at=now, release_reason=reason)
        .returning(Hold.account_id, Hold.key_id, Hold.amount_nanos)
        .execution_options(synchronize_session=False)
    ).all()
    by_account: dict[str, int] = defaultdict(int)
    by_key: dict[str, int] = defaultdict(int)
    for account_id, key_id, amount in released:
        by_account[account_id] += amount
        by_key[key_id] += amount
    # In id order, like every writer of these rows, so that writers never deadlock.
    for account_id, amount in sorted(by_account.items()):
        session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(held_nanos=Account.held_nanos - amount)
            .execution_options(synchronize_session=False)
        )
    for key_id, amount in sorted(by_key.items()):
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .values(held_nanos=ApiKey.held_nanos - amount)
            .execution_options(synchronize_session=False)
        )
    return len(released)


def open_holds(session: Session, account_ids: Iterable[str]) -> bool:
    """Whether any of these accounts has an open hold placed through PostgreSQL."""
    ids = list(account_ids)
    if not ids:
        return False
    query = select(Hold.id).where(Hold.account_id.in_(ids), Hold.released_at.is_(None)).limit(1)
    return session.scalar(query) is not None
