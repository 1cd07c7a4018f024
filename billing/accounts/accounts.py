"""Accounts: who pays. The prepaid balance belongs to the account, not to its keys.

``balance_nanos`` is written only by ``billing.ledger.ledger``, in the same transaction as the entry
that explains it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import BigInteger, String, select
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.core.db import Base
from billing.core.errors import NotFound
from billing.core.ids import new_id
from billing.core.money import Nanos


class Account(Base):
    """A customer account holding a prepaid balance in nano-dollars."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    balance_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    # Open holds placed through PostgreSQL (``billing.ledger.holds``); holds placed through
    # Redis are counted there. Written only by ``billing.ledger.holds``.
    held_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Moves with every change of ``balance_nanos``, so that copies of the balance (the Redis
    # hot path) can tell a newer value from an older one.
    balance_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[dt.datetime]

    @hybrid_property
    def available_nanos(self) -> Nanos:
        """What can still be spent: the balance minus the open holds PostgreSQL knows of.

        The one definition of available balance, in Python and in SQL alike; holds placed
        through Redis are subtracted where they count (``Runtime.funds``, the Redis script).
        """
        return self.balance_nanos - self.held_nanos

    def funds(self, *, redis_held_nanos: Nanos = 0) -> Funds:
        """The balance, the open holds (PostgreSQL's and ``redis_held_nanos``, those placed
        through Redis) and what is available after them."""
        return Funds(
            self.balance_nanos,
            self.held_nanos + redis_held_nanos,
            self.available_nanos - redis_held_nanos,
        )


@dataclass(frozen=True)
class Funds:
    """An account's money as operators and customers see it."""

    balance_nanos: Nanos
    held_nanos: Nanos
    """Every open hold counted: PostgreSQL's, and Redis's where it was reachable."""
    available_nanos: Nanos


class AccountNotFound(NotFound):
    """No account has that id."""


def create_account(session: Session, *, name: str, email: str | None, now: dt.datetime) -> Account:
    """Open an account with a zero balance."""
    account = Account(
        id=new_id("acct"),
        name=name,
        email=email,
        balance_nanos=0,
        held_nanos=0,
        balance_version=0,
        created_at=now,
    )
    session.add(account)
    session.flush()
    return account


def get_account(session: Session, account_id: str) -> Account:
    """The account with that id; raises AccountNotFound."""
    account = session.get(Account, account_id)
    if account is None:
        raise AccountNotFound(f"No account with id {account_id!r}.", param="account_id")
    return account


def list_accounts(session: Session, *, after: str | None, limit: int) -> list[Account]:
    """Accounts in creation order, starting after the id ``after``."""
    query = select(Account).order_by(Account.id).limit(limit)
    if after is not None:
        query = query.where(Account.id > after)
    return list(session.scalars(query))
