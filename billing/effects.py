"""Marks a transaction leaves for what must happen after it commits (never before).

Domain code records here what it did; ``Runtime.after_commit`` acts on it once the commit has
succeeded, so a rolled-back transaction has no effect outside the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from billing.keys import ApiKey

CHANGED_KEYS = "changed_keys"
USAGE_PENDING = "usage_pending"
PRICES_CHANGED = "prices_changed"


def mark_keys_changed(session: Session, keys: list[ApiKey]) -> None:
    """These keys changed state: mirror them after commit."""
    session.info.setdefault(CHANGED_KEYS, []).extend(keys)


def mark_usage_pending(session: Session) -> None:
    """Usage is waiting to be settled: trigger settlement after commit."""
    session.info[USAGE_PENDING] = True


def mark_prices_changed(session: Session) -> None:
    """A price or alias was added: parked unpriced usage may be priced now."""
    session.info[PRICES_CHANGED] = True


def take(session: Session) -> tuple[list[ApiKey], bool, bool]:
    """The marks of a committed transaction, cleared: changed keys, usage pending, prices."""
    info = session.info
    return (
        info.pop(CHANGED_KEYS, []),
        info.pop(USAGE_PENDING, False),
        info.pop(PRICES_CHANGED, False),
    )
