"""Disputes: ``charge.dispute.*`` events debit a disputed charge and re-credit a won one
(DESIGN 7.2).

Invariant: a dispute debits its amount once and, if won, re-credits it once (each entry keyed by
the dispute id, and recorded on its row).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.core.settings import Settings
from billing.ledger import ledger
from billing.ledger.ledger import EntryKind, Posting
from billing.payments.fulfilment import ACTOR, payment_of_charge, stripe_id
from billing.payments.models import Dispute, Payment
from billing.payments.stripe_api import cents_to_nanos

log = logging.getLogger(__name__)


def _dispute_row(session: Session, dispute: dict[str, Any], now: dt.datetime) -> Dispute | None:
    existing = session.scalars(
        select(Dispute).where(Dispute.id == dispute["id"]).with_for_update()
    ).first()
    payment = payment_of_charge(
        session, stripe_id(dispute.get("charge")), stripe_id(dispute.get("payment_intent"))
    )
    if existing is not None:
        return existing
    if payment is None:
        log.info("dispute %s: not a payment of ours", dispute["id"])
        return None
    row = Dispute(
        id=dispute["id"],
        payment_id=payment.id,
        amount_cents=int(dispute["amount"]),
        status=str(dispute.get("status")),
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


def _debit_dispute(
    session: Session, row: Dispute, account_id: str, settings: Settings, now: dt.datetime
) -> None:
    if row.debit_entry_id is not None:
        return
    entry, _ = ledger.post(
        session,
        Posting(
            account_id=account_id,
            kind=EntryKind.DISPUTE,
            amount_nanos=-cents_to_nanos(row.amount_cents),
            reason="Stripe dispute",
            actor=ACTOR,
            reference=row.id,
            idempotency_key=f"stripe-dispute:{row.id}",
        ),
        low_balance_nanos=settings.balance_low_threshold,
        now=now,
    )
    row.debit_entry_id = entry.id


def dispute_created(
    session: Session, dispute: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    """Record a dispute and debit its amount unless it is an inquiry or already won
    (``charge.dispute.created``); raises PaymentNotCredited for a payment not credited yet."""
    row = _dispute_row(session, dispute, now)
    if row is None:
        return
    # An inquiry (warning_*) withdraws no funds; a dispute already closed as won needs no debit.
    if str(dispute.get("status", "")).startswith("warning") or row.status == "won":
        return
    payment = session.get(Payment, row.payment_id)
    assert payment is not None
    _debit_dispute(session, row, payment.account_id, settings, now)


def dispute_closed(
    session: Session, dispute: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    """Settle a closed dispute (``charge.dispute.closed``): a lost one is debited once, a won
    one that was debited is re-credited once."""
    row = _dispute_row(session, dispute, now)
    if row is None:
        return
    payment = session.get(Payment, row.payment_id)
    assert payment is not None
    status = str(dispute.get("status"))
    row.status = status
    row.updated_at = now
    if status == "lost":
        _debit_dispute(session, row, payment.account_id, settings, now)
    elif status == "won" and row.debit_entry_id is not None and row.recredit_entry_id is None:
        entry, _ = ledger.post(
            session,
            Posting(
                account_id=payment.account_id,
                kind=EntryKind.DISPUTE_WON,
                amount_nanos=cents_to_nanos(row.amount_cents),
                reason="Stripe dispute won",
                actor=ACTOR,
                reference=row.id,
                idempotency_key=f"stripe-dispute-won:{row.id}",
            ),
            low_balance_nanos=settings.balance_low_threshold,
            now=now,
        )
        row.recredit_entry_id = entry.id
