"""Holds: the worst-case cost of a request in flight, reserved against the account's balance.

Placed at authorize time, released when the request's usage is settled (same request id) or
when they expire. This module keeps the holds placed through PostgreSQL (the embedded default,
and the fallback when Redis is down); ``billing.enforcement.hotpath`` keeps those placed
through Redis.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence

from sqlalchemy import BigInteger, ColumnElement, ForeignKey, Index, String, select, text, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.accounts.accounts import Account
from billing.accounts.keys import ApiKey
from billing.core.db import Base
from billing.core.effects import mark_requests_settled
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
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    released_at: Mapped[dt.datetime | None]
    release_reason: Mapped[str | None] = mapped_column(String(40))


def place(
    session: Session,
    *,
    key: ApiKey,
    hold_id: str,
    model_id: str,
    request_id: str,
    amount_nanos: Nanos,
    month_spend: Nanos,
    ttl: dt.timedelta,
    now: dt.datetime,
) -> tuple[Hold, Nanos] | None:
    """Reserve ``amount_nanos`` for ``request_id`` as hold ``hold_id``; returns the hold and the
    available balance left, or None if it does not fit the available balance, and raises
    QuotaExceeded if it does not fit the key's monthly cap (``month_spend`` is the key's settled
    spend this month).

    Each test-and-reserve is one conditional UPDATE, which PostgreSQL evaluates on the row's
    latest version under its row lock (and SQLite under its write lock), so concurrent holds
    can never together exceed the balance; the caller rolls its transaction back on a refusal.
    A repeated request id returns the hold placed for it.
    """
    earlier = session.scalars(select(Hold).where(Hold.request_id == request_id)).first()
    if earlier is not None:
        account = session.get_one(Account, key.account_id)
        return earlier, account.available_nanos
    available = session.execute(
        update(Account)
        .where(
            Account.id == key.account_id,
            Account.balance_nanos > 0,
            Account.available_nanos >= amount_nanos,
        )
        .values(held_nanos=Account.held_nanos + amount_nanos)
        .returning(Account.available_nanos)
        .execution_options(synchronize_session=False)
    ).scalar()
    if available is None:
        return None
    if key.monthly_cap_nanos is not None:
        fits = session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key.id,
                ApiKey.held_nanos + amount_nanos + month_spend <= ApiKey.monthly_cap_nanos,
            )
            .values(held_nanos=ApiKey.held_nanos + amount_nanos)
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
        amount_nanos=amount_nanos,
        created_at=now,
        expires_at=now + ttl,
    )
    session.add(hold)
    session.flush()
    return hold, int(available)


class QuotaExceeded(Exception):
    """The hold would take the key past its monthly cap."""


def release(session: Session, request_ids: Sequence[str], *, reason: str, now: dt.datetime) -> int:
    """Release the open holds of these requests; returns how many were open."""
    if not request_ids:
        return 0
    return _release(session, Hold.request_id.in_(request_ids), reason=reason, now=now)


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
