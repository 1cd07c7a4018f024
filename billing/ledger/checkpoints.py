"""How far reconciliation has verified the ledger, and each account's entries summed up to there,
so that proving every balance equals the sum of its entries (DESIGN invariant 3) reads only the
entries created since, not the whole ledger.

Invariants:
- The watermark (``reconcile_watermarks``) is a point in time before which everything was
  verified by a clean run; ``billing.metering.reconcile`` decides when it may move, and moves it
  only by compare and set from the point its run verified from, so two runs at once never both
  add the same entries.
- An account's checkpoint is the exact sum of its ledger entries created before the watermark:
  it moves in the same transaction as the watermark, by the entries of the window crossed.
- Entries are stamped with their transaction's clock before it commits. The watermark is only
  ever moved to a point far enough behind the clock that no transaction can still add entries
  before it; should one ever do so, its account's balance is reported as drift at the next run
  (loudly, never silently), and a clean ``billing reconcile --full`` rebuilds every checkpoint.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    ForeignKey,
    Select,
    String,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.accounts.accounts import Account
from billing.core.db import Base
from billing.ledger.ledger import Drift, LedgerEntry, reconcile

WATERMARK = "ledger"


class ReconcileWatermark(Base):
    """How far reconciliation has verified (one row, named ``ledger``)."""

    __tablename__ = "reconcile_watermarks"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    verified_through: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class LedgerCheckpoint(Base):
    """The sum of one account's ledger entries created before the watermark."""

    __tablename__ = "ledger_checkpoints"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    entries_nanos: Mapped[int] = mapped_column(BigInteger)


def verified_through(session: Session) -> dt.datetime | None:
    """The watermark: everything before it was verified by a clean run (None: never)."""
    return session.scalar(
        select(ReconcileWatermark.verified_through).where(ReconcileWatermark.name == WATERMARK)
    )


def balance_drift(session: Session, *, since: dt.datetime | None) -> list[Drift]:
    """Every account whose balance is not the sum of its ledger entries (empty: all is well).

    ``since`` must be :func:`verified_through` read in the same transaction: the checkpoints
    stand for the entries before it, so only the entries created since are read (an index range).
    None sums every entry of every account (``ledger.reconcile``).
    """
    if since is None:
        return reconcile(session)
    recent = (
        select(LedgerEntry.account_id, func.sum(LedgerEntry.amount_nanos).label("total"))
        .where(LedgerEntry.created_at >= since)
        .group_by(LedgerEntry.account_id)
        .subquery()
    )
    total = func.coalesce(LedgerCheckpoint.entries_nanos, 0) + func.coalesce(recent.c.total, 0)
    rows = session.execute(
        select(Account.id, Account.balance_nanos, total)
        .outerjoin(LedgerCheckpoint, LedgerCheckpoint.account_id == Account.id)
        .outerjoin(recent, recent.c.account_id == Account.id)
        .where(Account.balance_nanos != total)
        .order_by(Account.id)
    )
    return [Drift(account_id, balance, int(entries)) for account_id, balance, entries in rows]


def advance(
    session: Session,
    *,
    old: dt.datetime | None,
    new: dt.datetime,
    rebuild: bool,
    now: dt.datetime,
) -> bool:
    """Move the watermark from ``old`` to ``new``, and the checkpoints with it; False (nothing
    changed) if another run moved it from ``old`` first.

    The entries created in [old, new) are added to their accounts' checkpoints; with
    ``rebuild`` (or no ``old``) every checkpoint is summed afresh from the entries before ``new``.
    """
    if not _move(session, old=old, new=new, now=now):
        return False
    if rebuild or old is None:
        session.execute(delete(LedgerCheckpoint))
        session.execute(
            insert(LedgerCheckpoint).from_select(
                ["account_id", "entries_nanos"], _sums(LedgerEntry.created_at < new)
            )
        )
        return True
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(LedgerCheckpoint).from_select(
        ["account_id", "entries_nanos"],
        _sums(LedgerEntry.created_at >= old, LedgerEntry.created_at < new),
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["account_id"],
            set_={
                "entries_nanos": LedgerCheckpoint.entries_nanos + statement.excluded.entries_nanos
            },
        )
    )
    return True


def _sums(*window: ColumnElement[bool]) -> Select[str, int]:
    """Each account's sum of the entries in ``window``, in account order (the upsert's lock
    order)."""
    return (
        select(LedgerEntry.account_id, func.sum(LedgerEntry.amount_nanos))
        .where(*window)
        .group_by(LedgerEntry.account_id)
        .order_by(LedgerEntry.account_id)
    )


def _move(session: Session, *, old: dt.datetime | None, new: dt.datetime, now: dt.datetime) -> bool:
    """Compare and set: the watermark goes from ``old`` to ``new`` unless someone moved it."""
    if old is None:
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        statement: Any = (
            dialect.insert(ReconcileWatermark)
            .values(name=WATERMARK, verified_through=new, updated_at=now)
            .on_conflict_do_nothing(index_elements=["name"])
        )
    else:
        statement = (
            update(ReconcileWatermark)
            .where(
                ReconcileWatermark.name == WATERMARK,
                ReconcileWatermark.verified_through == old,
            )
            .values(verified_through=new, updated_at=now)
        )
    return session.execute(statement.returning(ReconcileWatermark.name)).first() is not None
