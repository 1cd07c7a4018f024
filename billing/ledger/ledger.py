"""The ledger: the only writer of ledger entries and account balances.

Invariants (DESIGN section 7), each held here and by the database:
- Every account's balance equals the sum of its entries: an entry and the balance change it
  explains are written in the same transaction, the balance by an atomic in-place increment.
  ``reconcile`` proves it on live data.
- Entries are append-only: the database refuses UPDATE and DELETE on ``ledger_entries``
  (a trigger); a mistake is corrected by a new entry.
- An entry's sign matches its kind (a CHECK constraint): top-ups and won disputes credit; usage,
  refunds and disputes debit; adjustments go either way; no entry is zero.
- An idempotency key is used once (a unique index); it is stored with a hash of the request it
  came with, and the same key with a different request is refused.
- Every balance move, by :func:`post` or :func:`post_usage`, is followed in the same
  transaction by one step (``_after_move``) that re-derives the account's key states, so a key
  is never left at a state its balance no longer calls for.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.accounts.accounts import Account, get_account
from billing.accounts.keys import refresh_keys_of
from billing.core.db import Base, BigIntId, newest_first
from billing.core.errors import Conflict, InvalidRequest
from billing.core.money import MAX_AMOUNT_NANOS, Nanos, format_usd
from billing.ledger import holds
from billing.notify import outbox


class EntryKind(enum.StrEnum):
    """Why money moved."""

    TOP_UP = "top_up"
    USAGE = "usage"
    ADJUSTMENT = "adjustment"
    REFUND = "refund"
    DISPUTE = "dispute"
    DISPUTE_WON = "dispute_won"


class LedgerEntry(Base):
    """One immutable movement of money on an account, in nano-dollars (negative debits)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint(
            "(kind IN ('top_up', 'dispute_won') AND amount_nanos > 0)"
            " OR (kind IN ('usage', 'refund', 'dispute') AND amount_nanos < 0)"
            " OR (kind = 'adjustment' AND amount_nanos <> 0)",
            name="sign_matches_kind",
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(500))
    reference: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(300), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(100))
    # Reconciliation reads entries by the window they were created in
    # (``billing.ledger.checkpoints``, ``billing.metering.reconcile``).
    created_at: Mapped[dt.datetime] = mapped_column(index=True)


class IdempotencyKeyReused(Conflict):
    """The idempotency key was already used for a different request."""

    code = "idempotency_key_reused"


@dataclass(frozen=True)
class Posting:
    """A movement to record: who, how much, why."""

    account_id: str
    kind: EntryKind
    amount_nanos: Nanos
    reason: str
    actor: str
    reference: str | None = None
    idempotency_key: str | None = None


def _request_hash(posting: Posting) -> str:
    fields = [
        posting.account_id,
        posting.kind,
        posting.amount_nanos,
        posting.reason,
        posting.reference,
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def post(
    session: Session, posting: Posting, *, low_balance_nanos: Nanos, now: dt.datetime
) -> tuple[LedgerEntry, bool]:
    """Record ``posting`` and move the balance; returns the entry and whether it is new.

    A balance that falls from above ``low_balance_nanos`` to it or below is announced
    (``account.balance_low``), and so is one that falls to zero or below.

    With an idempotency key, a repeat of the same posting returns the first entry unchanged
    and moves nothing; the same key with a different posting raises IdempotencyKeyReused.
    Key states of the account are re-derived from the new balance.
    """
    if posting.amount_nanos == 0:
        raise InvalidRequest("amount_usd must not be zero.", param="amount_usd")
    if not posting.reason.strip():
        raise InvalidRequest("reason must not be empty.", param="reason")
    request_hash = _request_hash(posting) if posting.idempotency_key else None
    if posting.idempotency_key is not None:
        earlier = _replay(session, posting.idempotency_key, request_hash)
        if earlier is not None:
            return earlier, False
    account = get_account(session, posting.account_id)
    if abs(account.balance_nanos + posting.amount_nanos) > MAX_AMOUNT_NANOS:
        raise InvalidRequest(
            "amount_usd would take the balance past the limit of"
            f" {format_usd(MAX_AMOUNT_NANOS)} USD.",
            param="amount_usd",
        )
    entry = LedgerEntry(
        account_id=account.id,
        kind=posting.kind,
        amount_nanos=posting.amount_nanos,
        reason=posting.reason.strip(),
        reference=posting.reference,
        idempotency_key=posting.idempotency_key,
        request_hash=request_hash,
        actor=posting.actor,
        created_at=now,
    )
    try:
        with session.begin_nested():
            _record(session, entry, low_balance_nanos)
    except IntegrityError:
        # A concurrent request with the same idempotency key committed first; answer as it did.
        assert posting.idempotency_key is not None
        earlier = _replay(session, posting.idempotency_key, request_hash)
        if earlier is None:
            raise
        return earlier, False
    direction = "credit" if posting.amount_nanos > 0 else "debit"
    _after_move(session, [account.id], reason=f"{posting.kind} {direction}", now=now)
    return entry, True


def write_usage_entries(
    session: Session, charges: dict[str, Nanos], *, batch: str, now: dt.datetime
) -> dict[str, LedgerEntry]:
    """Write one usage entry per account with a non-zero charge; the balances do not move yet.

    The caller must post them with :func:`post_usage` in the same transaction. Settlement
    writes its entries first (its events refer to them) and moves the balances last, so that
    it holds the account rows' locks, which concurrent batches queue on, for as little as it can.
    """
    entries = {
        account_id: LedgerEntry(
            account_id=account_id,
            kind=EntryKind.USAGE,
            amount_nanos=-amount,
            reason="usage",
            reference=f"settlement:{batch}",
            actor="settlement",
            created_at=now,
        )
        for account_id, amount in sorted(charges.items())
        if amount
    }
    session.add_all(entries.values())
    session.flush()
    return entries


def post_usage(
    session: Session,
    entries: Iterable[LedgerEntry],
    *,
    settled: Sequence[tuple[str, str]],
    low_balance_nanos: Nanos,
    now: dt.datetime,
) -> None:
    """Post the usage entries of :func:`write_usage_entries` and settle their requests.

    Moves each entry's account balance (in account order, so concurrent batches cannot
    deadlock), releases the holds of the ``settled`` requests (request id, account id) and
    re-derives the key states of their accounts, charged or not.
    """
    for entry in sorted(entries, key=lambda entry: entry.account_id):
        _move_balance(session, entry, low_balance_nanos)
    holds.release_settled(session, settled, now=now)
    _after_move(session, {account_id for _, account_id in settled}, reason="usage settled", now=now)


def _after_move(
    session: Session, account_ids: Iterable[str], *, reason: str, now: dt.datetime
) -> None:
    """What follows every balance move: the accounts' keys re-derive their states from the new
    balances (402 at zero or below, active again after a credit), and each change is recorded,
    mirrored and announced."""
    refresh_keys_of(session, sorted(account_ids), reason=reason, now=now)


def _record(session: Session, entry: LedgerEntry, low_balance_nanos: Nanos) -> None:
    """Write ``entry`` and move its account's balance."""
    session.add(entry)
    session.flush()
    _move_balance(session, entry, low_balance_nanos)


def _move_balance(session: Session, entry: LedgerEntry, low_balance_nanos: Nanos) -> None:
    """Move the balance by ``entry``'s amount by an atomic in-place increment; announce the
    balance crossing ``low_balance_nanos`` or zero (``billing.notify.outbox``)."""
    balance = session.execute(
        update(Account)
        .where(Account.id == entry.account_id)
        .values(
            balance_nanos=Account.balance_nanos + entry.amount_nanos,
            balance_version=Account.balance_version + 1,
        )
        .returning(Account.balance_nanos)
    ).scalar_one()
    # The balance this entry moved from, exactly: the increment is atomic.
    outbox.announce_balance(
        session,
        account_id=entry.account_id,
        before=balance - entry.amount_nanos,
        after=balance,
        ledger_entry_id=entry.id,
        threshold=low_balance_nanos,
        now=entry.created_at,
    )


def _replay(session: Session, idempotency_key: str, request_hash: str | None) -> LedgerEntry | None:
    earlier = session.scalars(
        select(LedgerEntry).where(LedgerEntry.idempotency_key == idempotency_key)
    ).first()
    if earlier is not None and earlier.request_hash != request_hash:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request.",
            param="Idempotency-Key",
        )
    return earlier


def entries(
    session: Session, account_id: str, *, before: int | None, limit: int
) -> list[LedgerEntry]:
    """An account's entries, newest first, starting before the entry id ``before``."""
    get_account(session, account_id)
    query = select(LedgerEntry).where(LedgerEntry.account_id == account_id)
    return list(session.scalars(newest_first(query, LedgerEntry.id, before=before, limit=limit)))


@dataclass(frozen=True)
class Drift:
    """An account whose stored balance differs from the sum of its entries."""

    account_id: str
    balance_nanos: Nanos
    entries_nanos: Nanos

    def __str__(self) -> str:
        return (
            f"{self.account_id}: balance {format_usd(self.balance_nanos)} USD,"
            f" entries sum to {format_usd(self.entries_nanos)} USD"
        )


def reconcile(session: Session) -> list[Drift]:
    """Every account whose balance is not the sum of its ledger entries (empty: all is well)."""
    sums = (
        select(LedgerEntry.account_id, func.sum(LedgerEntry.amount_nanos).label("total"))
        .group_by(LedgerEntry.account_id)
        .subquery()
    )
    rows = session.execute(
        select(Account.id, Account.balance_nanos, func.coalesce(sums.c.total, 0))
        .outerjoin(sums, sums.c.account_id == Account.id)
        .where(Account.balance_nanos != func.coalesce(sums.c.total, 0))
        .order_by(Account.id)
    )
    return [Drift(account_id, balance, int(total)) for account_id, balance, total in rows]
