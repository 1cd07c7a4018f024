"""Marks a transaction leaves for what must happen after it commits (never before).

Domain code records here what it did; ``Runtime.after_commit`` acts on it once the commit has
succeeded, so a rolled-back transaction has no effect outside the database. Marks carry ids and
plain values, never ORM rows: what acts on them reads the committed rows itself, and this module
depends on no domain package.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

CHANGED_KEYS = "changed_keys"
NEW_STATES = "new_key_states"
USAGE_PENDING = "usage_pending"
PRICES_CHANGED = "prices_changed"
WEBHOOKS_PENDING = "webhooks_pending"
ACCOUNTS = "account_snapshots"
SETTLED_REQUESTS = "settled_requests"


@dataclass
class AccountSnapshot:
    """An account's balance as of a version, with its capped keys' spend this month, for the
    hot path's copy (``billing.enforcement.hotpath``)."""

    version: int
    balance_nanos: int
    month_spend: dict[str, tuple[str, int]] = field(default_factory=dict)
    """key id -> (UTC month ``YYYY-MM``, settled spend in that month)."""


@dataclass(frozen=True)
class Marks:
    """What a committed transaction left to do."""

    changed_keys: list[str]
    """Ids of the keys whose state changed."""
    new_states: list[str]
    """The new state of each key-state change (counted in ``billing.core.metrics``)."""
    usage_pending: bool
    prices_changed: bool
    webhooks_pending: bool
    accounts: dict[str, AccountSnapshot]
    settled_requests: list[str]


def mark_keys_changed(session: Session, key_ids: Iterable[str]) -> None:
    """The keys with these ids changed state: mirror them after commit."""
    session.info.setdefault(CHANGED_KEYS, []).extend(key_ids)


def mark_state_changed(session: Session, key_id: str, new_state: str) -> None:
    """The key with this id changed to ``new_state``: mirror it and count the change."""
    mark_keys_changed(session, [key_id])
    session.info.setdefault(NEW_STATES, []).append(new_state)


def mark_usage_pending(session: Session) -> None:
    """Usage is waiting to be settled: trigger settlement after commit."""
    session.info[USAGE_PENDING] = True


def mark_prices_changed(session: Session) -> None:
    """A price or alias was added: parked unpriced usage may be priced now."""
    session.info[PRICES_CHANGED] = True


def mark_webhooks_pending(session: Session) -> None:
    """Webhook deliveries were queued: have them sent after commit."""
    session.info[WEBHOOKS_PENDING] = True


def mark_account(
    session: Session,
    account_id: str,
    *,
    version: int,
    balance_nanos: int,
    month_spend: dict[str, tuple[str, int]],
) -> None:
    """The account's balance (at ``version``) and these keys' spend are current: copy them to
    the hot path after commit."""
    snapshots: dict[str, AccountSnapshot] = session.info.setdefault(ACCOUNTS, {})
    snapshot = snapshots.get(account_id)
    if snapshot is None or snapshot.version <= version:
        spend = {**snapshot.month_spend, **month_spend} if snapshot else dict(month_spend)
        snapshots[account_id] = AccountSnapshot(version, balance_nanos, spend)


def mark_requests_settled(session: Session, request_ids: list[str]) -> None:
    """These requests' usage is settled: release their hot-path holds after commit."""
    session.info.setdefault(SETTLED_REQUESTS, []).extend(request_ids)


def take(session: Session) -> Marks:
    """The marks of a committed transaction, cleared."""
    info = session.info
    return Marks(
        changed_keys=info.pop(CHANGED_KEYS, []),
        new_states=info.pop(NEW_STATES, []),
        usage_pending=info.pop(USAGE_PENDING, False),
        prices_changed=info.pop(PRICES_CHANGED, False),
        webhooks_pending=info.pop(WEBHOOKS_PENDING, False),
        accounts=info.pop(ACCOUNTS, {}),
        settled_requests=info.pop(SETTLED_REQUESTS, []),
    )
