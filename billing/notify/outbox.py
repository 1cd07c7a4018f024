"""The webhook outbox: what a transaction queues to announce the change it makes.

Invariants:
- An event is written to an outbox (``webhook_events``), with one delivery per enabled endpoint
  subscribed to its type, in the same transaction as the change it announces: a change that
  rolls back announces nothing, and a committed one is never lost. An event no endpoint
  subscribes to is not stored (``key_state_changes`` and the ledger keep the history).
- Every key event carries the key's state as the gateway enforces it (``state``,
  ``http_status``, ``code``) and its ``sequence``, which increases with each event of the key
  (``billing.accounts.keys``): deliveries come in no guaranteed order, and a receiver keeps the
  highest sequence it has seen per key and drops older ones.
- Balance events compare the balance before and after each ledger entry, computed from the
  atomic increment itself, so concurrent entries each see their own crossing: the notice is
  sent once per crossing of the threshold (or of zero) from above.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.core.effects import mark_webhooks_pending
from billing.core.money import Nanos, format_usd
from billing.notify.models import (
    DeliveryStatus,
    EventType,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    rfc3339,
)


def emit(
    session: Session, type_: EventType, payload: dict[str, Any], *, now: dt.datetime
) -> WebhookEvent | None:
    """Queue an event for every enabled endpoint subscribed to ``type_``; None if there is none.

    Adds rows without flushing, so callers may emit before the rows the payload names are
    flushed (a new key announces its first state before it is added to the session).
    """
    with session.no_autoflush:
        endpoints = session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.disabled_at.is_(None))
            .order_by(WebhookEndpoint.id)
        ).all()
    subscribed = [endpoint for endpoint in endpoints if type_ in endpoint.event_types]
    if not subscribed:
        return None
    event = WebhookEvent(type=type_, payload=payload, created_at=now)
    session.add(event)
    for endpoint in subscribed:
        session.add(
            WebhookDelivery(
                event=event,
                endpoint_id=endpoint.id,
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    mark_webhooks_pending(session)
    return event


@dataclass(frozen=True)
class KeyEvent:
    """What every key event's ``data`` carries: the key, its state and its sequence."""

    key_id: str
    account_id: str
    state: str
    http_status: int
    code: str | None
    """The ``error.code`` the state is refused with; None while active."""
    sequence: int


def announce_key_created(session: Session, key: KeyEvent, *, now: dt.datetime) -> None:
    """Emit ``key.created``: a key was issued, in ``key.state``."""
    emit(session, EventType.KEY_CREATED, asdict(key) | {"created_at": rfc3339(now)}, now=now)


def announce_key_state(
    session: Session, key: KeyEvent, *, old_state: str, reason: str, now: dt.datetime
) -> None:
    """Emit ``key.state_changed``: the key went from ``old_state`` to ``key.state``."""
    emit(
        session,
        EventType.KEY_STATE_CHANGED,
        asdict(key)
        | {
            "old_state": old_state,
            "new_state": key.state,
            "reason": reason,
            "changed_at": rfc3339(now),
        },
        now=now,
    )


def announce_balance(
    session: Session,
    *,
    account_id: str,
    before: Nanos,
    after: Nanos,
    ledger_entry_id: int,
    threshold: Nanos,
    now: dt.datetime,
) -> None:
    """Emit ``account.balance_low`` and ``account.balance_depleted`` when a balance crosses
    ``threshold`` or zero from above."""
    common = {
        "account_id": account_id,
        "balance_usd": format_usd(after),
        "previous_balance_usd": format_usd(before),
        "ledger_entry_id": ledger_entry_id,
        "changed_at": rfc3339(now),
    }
    if before > threshold >= after:
        emit(
            session,
            EventType.BALANCE_LOW,
            common | {"threshold_usd": format_usd(threshold)},
            now=now,
        )
    if before > 0 >= after:
        emit(session, EventType.BALANCE_DEPLETED, common, now=now)


def announce_top_up(
    session: Session,
    *,
    account_id: str,
    payment_id: str,
    source: str,
    amount: Nanos,
    balance: Nanos,
    ledger_entry_id: int,
    now: dt.datetime,
) -> None:
    """Emit ``topup.succeeded``: a Stripe payment (``source`` top_up or auto_recharge) was
    credited."""
    emit(
        session,
        EventType.TOPUP_SUCCEEDED,
        {
            "account_id": account_id,
            "payment_id": payment_id,
            "source": source,
            "amount_usd": format_usd(amount),
            "balance_usd": format_usd(balance),
            "ledger_entry_id": ledger_entry_id,
            "succeeded_at": rfc3339(now),
        },
        now=now,
    )


def announce_auto_recharge_failed(
    session: Session,
    *,
    account_id: str,
    payment_id: str,
    amount: Nanos,
    reason: str,
    retry_after: dt.datetime,
    now: dt.datetime,
) -> None:
    """Emit ``auto_recharge.failed``: an off-session charge was declined; none is tried again
    before ``retry_after``."""
    emit(
        session,
        EventType.AUTO_RECHARGE_FAILED,
        {
            "account_id": account_id,
            "payment_id": payment_id,
            "amount_usd": format_usd(amount),
            "reason": reason,
            "retry_after": rfc3339(retry_after),
            "failed_at": rfc3339(now),
        },
        now=now,
    )
