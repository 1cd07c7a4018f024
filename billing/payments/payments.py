"""Stripe top-ups, refunds, disputes, reconciliation and auto-recharge (DESIGN 6.5, 7.2).

Invariants, each held here and by the database:
- A Stripe payment is credited exactly once, whatever the order and repetition of the events
  that announce it (``payment_intent.succeeded``, the checkout events, reconciliation, the
  auto-recharge run): every path locks the payment's row and credits through
  :func:`billing.ledger.ledger.post` with the idempotency key ``stripe-payment:<payment id>``, which
  a unique index holds; the payment records its one credit (``credit_entry_id``, unique), and a
  PaymentIntent or Checkout Session id belongs to one payment (unique).
- A Stripe event is applied at most once: its id is stored (primary key) in the transaction
  that applies it, so a repeat is answered as a duplicate; an event whose processing fails
  rolls back, id included, so Stripe's retry applies it.
- A refund debits exactly the change in the charge's cumulative ``amount_refunded`` (one entry
  per cumulative amount, keyed by it), so partial, full, repeated and reordered refund events
  debit the refunded total once. A dispute debits its amount once and, if won, re-credits it once.
- Money crosses to Stripe in cents and back exactly (``billing.payments.stripe_api``).
- Auto-recharge charges a saved card off-session only when the account's available balance is
  below its threshold, never while another of its charges is pending (a unique partial index),
  never within the back-off after a decline, and never past the daily cap. Each charge carries
  an idempotency key, so a run that dies after asking Stripe repeats the same request, not a new
  charge.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    func,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.accounts.accounts import Account, get_account
from billing.core.db import Base
from billing.core.errors import Conflict, InvalidRequest, NotFound
from billing.core.ids import new_id
from billing.core.money import Nanos, format_usd
from billing.core.settings import Settings
from billing.ledger import ledger
from billing.ledger.ledger import EntryKind, Posting
from billing.notify import outbox
from billing.payments import stripe_api
from billing.payments.stripe_api import cents_to_nanos, nanos_to_cents

log = logging.getLogger(__name__)

MODES = ("payment_intent", "checkout")
ACTOR = "stripe"
# Back-off after consecutive declines doubles up to this.
MAX_BACKOFF = dt.timedelta(hours=24)
# A claimed auto-recharge that has no PaymentIntent after this long lost its run; ask again.
LOST_CHARGE_AFTER = dt.timedelta(minutes=2)


class PaymentStatus:
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Source:
    TOP_UP = "top_up"
    AUTO_RECHARGE = "auto_recharge"


class StripeCustomer(Base):
    """The Stripe customer of an account (one each)."""

    __tablename__ = "stripe_customers"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime]


class Payment(Base):
    """One Stripe payment meant to credit an account: a top-up or an auto-recharge."""

    __tablename__ = "payments"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="status_known"),
        CheckConstraint("source IN ('top_up', 'auto_recharge')", name="source_known"),
        CheckConstraint("mode IN ('payment_intent', 'checkout')", name="mode_known"),
        CheckConstraint("amount_cents > 0", name="amount_positive"),
        CheckConstraint("refunded_cents >= 0", name="refunded_not_negative"),
        CheckConstraint(
            "(status = 'succeeded') = (credit_entry_id IS NOT NULL)", name="credited_iff_succeeded"
        ),
        # No new auto-recharge charge while one is pending.
        Index(
            "ix_payments_one_pending_auto_recharge",
            "account_id",
            unique=True,
            postgresql_where=text("source = 'auto_recharge' AND status = 'pending'"),
            sqlite_where=text("source = 'auto_recharge' AND status = 'pending'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    source: Mapped[str] = mapped_column(String(20))
    mode: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    payment_intent_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    checkout_session_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    charge_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    refunded_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_entry_id: Mapped[int | None] = mapped_column(
        ForeignKey("ledger_entries.id"), unique=True
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    failure_message: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    @property
    def amount_nanos(self) -> Nanos:
        """The amount in nano-dollars."""
        return cents_to_nanos(self.amount_cents)


class StripeEvent(Base):
    """A Stripe event already applied (its id): a repeat is a duplicate."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    processed_at: Mapped[dt.datetime]


class Dispute(Base):
    """A dispute on a payment's charge, with the entries that debited and re-credited it."""

    __tablename__ = "stripe_disputes"
    __table_args__ = (CheckConstraint("amount_cents > 0", name="amount_positive"),)

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(40))
    debit_entry_id: Mapped[int | None] = mapped_column(ForeignKey("ledger_entries.id"))
    recredit_entry_id: Mapped[int | None] = mapped_column(ForeignKey("ledger_entries.id"))
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class AutoRecharge(Base):
    """An account's auto-recharge: below ``threshold`` charge ``amount`` to a saved card."""

    __tablename__ = "auto_recharges"
    __table_args__ = (
        CheckConstraint("threshold_nanos >= 0", name="threshold_not_negative"),
        CheckConstraint("amount_nanos > 0", name="amount_positive"),
        CheckConstraint("daily_cap_nanos >= amount_nanos", name="cap_fits_amount"),
        CheckConstraint("consecutive_failures >= 0", name="failures_not_negative"),
    )

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    threshold_nanos: Mapped[int] = mapped_column(BigInteger)
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    daily_cap_nanos: Mapped[int] = mapped_column(BigInteger)
    payment_method_id: Mapped[str | None] = mapped_column(String(100))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    retry_after: Mapped[dt.datetime | None]
    last_failure: Mapped[str | None] = mapped_column(String(500))
    updated_at: Mapped[dt.datetime]


class PaymentNotFound(NotFound):
    """No payment of this account has that id."""


class AutoRechargeNotSet(NotFound):
    """The account has no auto-recharge settings."""


class PaymentNotCredited(Conflict):
    """A refund or dispute names a payment not credited yet; Stripe retries it later."""

    code = "payment_not_credited"


# Customers


def ensure_customer(
    session: Session, account_id: str, *, settings: Settings, now: dt.datetime
) -> str:
    """The account's Stripe customer id, creating the customer on first use."""
    row = session.get(StripeCustomer, account_id)
    if row is not None:
        return row.customer_id
    account = get_account(session, account_id)
    # Stripe's idempotency key (the account id) makes a concurrent first use get the same one.
    customer_id = stripe_api.create_customer(
        settings, account_id=account.id, name=account.name, email=account.email
    )
    try:
        with session.begin_nested():
            session.add(
                StripeCustomer(account_id=account.id, customer_id=customer_id, created_at=now)
            )
    except IntegrityError:
        pass  # a concurrent request stored it first
    return customer_id


# Top-ups


@dataclass(frozen=True)
class TopUpStart:
    """What the page needs to take a payment: a client secret (card form) or a Checkout URL."""

    mode: str
    payment_id: str
    amount_nanos: Nanos
    publishable_key: str | None
    client_secret: str | None = None
    checkout_url: str | None = None


def top_up_presets(settings: Settings) -> list[Nanos]:
    """The preset amounts the page offers, in nano-dollars."""
    return settings.topup_presets


def top_up_limits(settings: Settings) -> tuple[Nanos, Nanos]:
    """The smallest and largest top-up, in nano-dollars."""
    return settings.topup_min, settings.topup_max


def check_top_up_amount(amount_nanos: Nanos, settings: Settings) -> int:
    """The amount in cents; raises InvalidRequest naming what is wrong with it."""
    low, high = top_up_limits(settings)
    if not low <= amount_nanos <= high:
        raise InvalidRequest(
            f"amount_usd must be between {format_usd(low)} and {format_usd(high)} USD.",
            param="amount_usd",
        )
    return nanos_to_cents(amount_nanos)


def start_top_up(
    session: Session, *, account_id: str, amount_nanos: Nanos, settings: Settings, now: dt.datetime
) -> TopUpStart:
    """Open a top-up of ``amount_nanos`` in the configured mode (TOPUP_MODE).

    Creates the Stripe PaymentIntent (its client secret is for the page's card form) or Checkout
    Session and a pending payment; the account is credited when Stripe confirms the payment.
    Raises InvalidRequest for an amount outside the limits or not in whole cents,
    AccountNotFound, StripeUnavailable.
    """
    cents = check_top_up_amount(amount_nanos, settings)
    customer_id = ensure_customer(session, account_id, settings=settings, now=now)
    payment = Payment(
        id=new_id("pay"),
        account_id=account_id,
        source=Source.TOP_UP,
        mode=settings.topup_mode,
        status=PaymentStatus.PENDING,
        amount_cents=cents,
        refunded_cents=0,
        created_at=now,
        updated_at=now,
    )
    metadata = {"account_id": account_id, "payment_id": payment.id, "source": Source.TOP_UP}
    if settings.topup_mode == "checkout":
        base = settings.public_base_url.rstrip("/")
        checkout = stripe_api.create_checkout_session(
            settings,
            customer_id=customer_id,
            cents=cents,
            metadata=metadata,
            success_url=f"{base}/billing?payment={payment.id}",
            cancel_url=f"{base}/billing",
        )
        payment.checkout_session_id = checkout["id"]
        session.add(payment)
        session.flush()
        return TopUpStart(
            mode="checkout",
            payment_id=payment.id,
            amount_nanos=amount_nanos,
            publishable_key=settings.stripe_publishable_key,
            checkout_url=checkout.get("url"),
        )
    intent = stripe_api.create_payment_intent(
        settings, customer_id=customer_id, cents=cents, metadata=metadata
    )
    payment.payment_intent_id = intent["id"]
    session.add(payment)
    session.flush()
    return TopUpStart(
        mode="payment_intent",
        payment_id=payment.id,
        amount_nanos=amount_nanos,
        publishable_key=settings.stripe_publishable_key,
        client_secret=intent.get("client_secret"),
    )


def pay_top_up(
    session: Session,
    *,
    account_id: str,
    payment_id: str,
    token: str,
    settings: Settings,
    now: dt.datetime,
) -> dict[str, Any]:
    """Pay the account's pending card top-up with a card token from Stripe.js; returns the
    PaymentIntent (its ``status`` and ``client_secret``). The account is credited when the
    webhook (or reconciliation) confirms the payment, never here.

    Raises PaymentNotFound, InvalidRequest (the payment is not a pending card top-up),
    CardDeclined, StripeUnavailable.
    """
    payment = get_payment(session, account_id=account_id, payment_id=payment_id)
    if payment.status != PaymentStatus.PENDING or payment.payment_intent_id is None:
        raise InvalidRequest(
            f"Payment {payment_id} is not a card top-up waiting to be paid.", param="payment_id"
        )
    return stripe_api.pay_with_card_token(
        settings,
        customer_id=ensure_customer(session, account_id, settings=settings, now=now),
        payment_intent_id=payment.payment_intent_id,
        token=token,
    )


def has_saved_card(session: Session, account_id: str) -> bool:
    """Whether the account has a card saved for auto-recharge."""
    config = session.get(AutoRecharge, account_id)
    return config is not None and config.payment_method_id is not None


def get_payment(session: Session, *, account_id: str, payment_id: str) -> Payment:
    """A payment of the account (the page polls it); raises PaymentNotFound."""
    payment = session.get(Payment, payment_id)
    if payment is None or payment.account_id != account_id:
        raise PaymentNotFound(f"No payment with id {payment_id!r}.", param="payment_id")
    return payment


# Crediting and failing


def _id(value: Any) -> str | None:
    """An id field that the current API sends as a string and older ones (and localstripe)
    expand into an object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


def _locked(session: Session, *conditions: Any) -> Payment | None:
    return session.scalars(
        select(Payment)
        .where(*conditions)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def _payment_for(
    session: Session,
    *,
    intent_id: str | None,
    checkout_id: str | None,
    metadata: dict[str, Any],
    cents: int,
    mode: str,
    now: dt.datetime,
) -> Payment | None:
    """The payment these Stripe ids or metadata name, locked; one is recorded for a payment of
    ours (metadata names an account) that we have no row for. None: not ours."""
    payment = None
    if intent_id is not None:
        payment = _locked(session, Payment.payment_intent_id == intent_id)
    if payment is None and checkout_id is not None:
        payment = _locked(session, Payment.checkout_session_id == checkout_id)
    payment_id = metadata.get("payment_id")
    if payment is None and isinstance(payment_id, str):
        payment = _locked(session, Payment.id == payment_id)
    if payment is not None:
        if intent_id is not None and payment.payment_intent_id is None:
            payment.payment_intent_id = intent_id
        if checkout_id is not None and payment.checkout_session_id is None:
            payment.checkout_session_id = checkout_id
        return payment
    account_id = metadata.get("account_id")
    if not isinstance(account_id, str) or session.get(Account, account_id) is None or cents <= 0:
        return None
    # Ours, but its row was lost (the request that made it rolled back after asking Stripe).
    # The unique Stripe ids make a concurrent second insert fail, and the event is retried.
    payment = Payment(
        id=payment_id if isinstance(payment_id, str) else new_id("pay"),
        account_id=account_id,
        source=metadata.get("source")
        if metadata.get("source") == Source.AUTO_RECHARGE
        else Source.TOP_UP,
        mode=mode,
        status=PaymentStatus.PENDING,
        amount_cents=cents,
        refunded_cents=0,
        payment_intent_id=intent_id,
        checkout_session_id=checkout_id,
        created_at=now,
        updated_at=now,
    )
    session.add(payment)
    session.flush()
    return payment


def _credit(
    session: Session, payment: Payment, *, cents: int, charge_id: str | None, now: dt.datetime
) -> bool:
    """Credit the (locked) payment's account with ``cents`` unless already credited; returns
    whether this call credited it."""
    if charge_id is not None and payment.charge_id is None:
        payment.charge_id = charge_id
    if payment.credit_entry_id is not None:
        return False
    reason = "auto-recharge" if payment.source == Source.AUTO_RECHARGE else "Stripe top-up"
    entry, _ = ledger.post(
        session,
        Posting(
            account_id=payment.account_id,
            kind=EntryKind.TOP_UP,
            amount_nanos=cents_to_nanos(cents),
            reason=reason,
            actor=ACTOR,
            reference=payment.payment_intent_id or payment.checkout_session_id or payment.id,
            idempotency_key=f"stripe-payment:{payment.id}",
        ),
        now=now,
    )
    payment.amount_cents = cents
    payment.status = PaymentStatus.SUCCEEDED
    payment.credit_entry_id = entry.id
    payment.failure_message = None
    payment.updated_at = now
    session.flush()
    if payment.source == Source.AUTO_RECHARGE:
        config = session.get(AutoRecharge, payment.account_id)
        if config is not None:
            config.consecutive_failures = 0
            config.retry_after = None
    balance = session.scalar(select(Account.balance_nanos).where(Account.id == payment.account_id))
    outbox.announce_top_up(
        session,
        account_id=payment.account_id,
        payment_id=payment.id,
        source=payment.source,
        amount=entry.amount_nanos,
        balance=balance or 0,
        ledger_entry_id=entry.id,
        now=now,
    )
    log.info("payment %s credited %s USD", payment.id, format_usd(entry.amount_nanos))
    return True


def _fail(
    session: Session, payment: Payment, *, message: str, settings: Settings, now: dt.datetime
) -> None:
    """Mark a pending payment failed; an auto-recharge backs off and is announced. A payment
    already credited or failed is left alone (the first failure report counts once)."""
    if payment.status != PaymentStatus.PENDING:
        return
    payment.status = PaymentStatus.FAILED
    payment.failure_message = message[:500]
    payment.updated_at = now
    if payment.source != Source.AUTO_RECHARGE:
        return
    config = session.get(AutoRecharge, payment.account_id)
    failures = 1
    retry_after = now + dt.timedelta(seconds=settings.auto_recharge_backoff_seconds)
    if config is not None:
        config.consecutive_failures += 1
        failures = config.consecutive_failures
        backoff = dt.timedelta(seconds=settings.auto_recharge_backoff_seconds) * 2 ** (failures - 1)
        retry_after = now + min(backoff, MAX_BACKOFF)
        config.retry_after = retry_after
        config.last_failure = message[:500]
    log.warning(
        "auto-recharge %s of account %s declined (%d in a row): %s; next try after %s",
        payment.id,
        payment.account_id,
        failures,
        message,
        retry_after.isoformat(),
    )
    outbox.announce_auto_recharge_failed(
        session,
        account_id=payment.account_id,
        payment_id=payment.id,
        amount=payment.amount_nanos,
        reason=message,
        retry_after=retry_after,
        now=now,
    )


def _fulfil_intent(session: Session, intent: dict[str, Any], *, now: dt.datetime) -> bool:
    """Credit a succeeded PaymentIntent of ours once; returns whether this call credited it."""
    if intent.get("currency") != stripe_api.CURRENCY:
        log.error(
            "PaymentIntent %s is in %r, not USD: not credited",
            intent.get("id"),
            intent.get("currency"),
        )
        return False
    cents = int(intent.get("amount_received") or intent.get("amount") or 0)
    payment = _payment_for(
        session,
        intent_id=intent["id"],
        checkout_id=None,
        metadata=intent.get("metadata") or {},
        cents=cents,
        mode="payment_intent",
        now=now,
    )
    if payment is None:
        log.info("PaymentIntent %s is not a payment of ours: ignored", intent.get("id"))
        return False
    return _credit(
        session, payment, cents=cents, charge_id=_id(intent.get("latest_charge")), now=now
    )


def _fulfil_checkout(session: Session, checkout: dict[str, Any], *, now: dt.datetime) -> bool:
    """Credit a paid Checkout Session of ours once; returns whether this call credited it."""
    if checkout.get("currency") != stripe_api.CURRENCY:
        log.error("Checkout Session %s is not in USD: not credited", checkout.get("id"))
        return False
    cents = int(checkout.get("amount_total") or 0)
    payment = _payment_for(
        session,
        intent_id=_id(checkout.get("payment_intent")),
        checkout_id=checkout["id"],
        metadata=checkout.get("metadata") or {},
        cents=cents,
        mode="checkout",
        now=now,
    )
    if payment is None:
        log.info("Checkout Session %s is not a payment of ours: ignored", checkout.get("id"))
        return False
    return _credit(session, payment, cents=cents, charge_id=None, now=now)


# Stripe events


def _payment_intent_succeeded(
    session: Session, intent: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    _fulfil_intent(session, intent, now=now)


def _payment_intent_failed(
    session: Session, intent: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    payment = _locked(session, Payment.payment_intent_id == intent["id"])
    payment_id = (intent.get("metadata") or {}).get("payment_id")
    if payment is None and isinstance(payment_id, str):
        payment = _locked(session, Payment.id == payment_id)
    if payment is None:
        return
    error = intent.get("last_payment_error") or {}
    message = error.get("message") or error.get("code") or "payment failed"
    if payment.source == Source.TOP_UP:
        # The customer may try another card on the same PaymentIntent: only a record, not final.
        if payment.status == PaymentStatus.PENDING:
            payment.failure_message = str(message)[:500]
            payment.updated_at = now
        return
    _fail(session, payment, message=str(message), settings=settings, now=now)


def _checkout_completed(
    session: Session, checkout: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    if checkout.get("payment_status") == "paid":
        _fulfil_checkout(session, checkout, now=now)
    # Otherwise an asynchronous method (a bank debit) is still settling: the async events follow.


def _checkout_async_succeeded(
    session: Session, checkout: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    _fulfil_checkout(session, checkout, now=now)


def _checkout_async_failed(
    session: Session, checkout: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    payment = _locked(session, Payment.checkout_session_id == checkout["id"])
    if payment is not None:
        _fail(session, payment, message="the payment did not complete", settings=settings, now=now)


def _payment_of_charge(
    session: Session, charge_id: str | None, intent_id: str | None
) -> Payment | None:
    """The locked payment of a charge (by charge id, else PaymentIntent id); raises
    PaymentNotCredited if it is not credited yet (Stripe retries the event), None if not ours."""
    payment = None
    if charge_id is not None:
        payment = _locked(session, Payment.charge_id == charge_id)
    if payment is None and intent_id is not None:
        payment = _locked(session, Payment.payment_intent_id == intent_id)
    if payment is not None and payment.credit_entry_id is None:
        raise PaymentNotCredited(
            f"Payment {payment.id} is not credited yet; the event will apply once it is."
        )
    return payment


def _charge_refunded(
    session: Session, charge: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    payment = _payment_of_charge(session, charge["id"], _id(charge.get("payment_intent")))
    if payment is None:
        log.info("refund of charge %s: not a payment of ours", charge["id"])
        return
    if payment.charge_id is None:
        payment.charge_id = charge["id"]
    refunded = int(charge.get("amount_refunded") or 0)
    change = refunded - payment.refunded_cents
    if change <= 0:
        return  # a repeat, or an older cumulative amount arriving late
    ledger.post(
        session,
        Posting(
            account_id=payment.account_id,
            kind=EntryKind.REFUND,
            amount_nanos=-cents_to_nanos(change),
            reason="Stripe refund",
            actor=ACTOR,
            reference=charge["id"],
            idempotency_key=f"stripe-refund:{payment.id}:{refunded}",
        ),
        now=now,
    )
    payment.refunded_cents = refunded
    payment.updated_at = now


def _dispute_row(session: Session, dispute: dict[str, Any], now: dt.datetime) -> Dispute | None:
    existing = session.scalars(
        select(Dispute).where(Dispute.id == dispute["id"]).with_for_update()
    ).first()
    payment = _payment_of_charge(
        session, _id(dispute.get("charge")), _id(dispute.get("payment_intent"))
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


def _debit_dispute(session: Session, row: Dispute, account_id: str, now: dt.datetime) -> None:
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
        now=now,
    )
    row.debit_entry_id = entry.id


def _dispute_created(
    session: Session, dispute: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    row = _dispute_row(session, dispute, now)
    if row is None:
        return
    # An inquiry (warning_*) withdraws no funds; a dispute already closed as won needs no debit.
    if str(dispute.get("status", "")).startswith("warning") or row.status == "won":
        return
    payment = session.get(Payment, row.payment_id)
    assert payment is not None
    _debit_dispute(session, row, payment.account_id, now)


def _dispute_closed(
    session: Session, dispute: dict[str, Any], settings: Settings, now: dt.datetime
) -> None:
    row = _dispute_row(session, dispute, now)
    if row is None:
        return
    payment = session.get(Payment, row.payment_id)
    assert payment is not None
    status = str(dispute.get("status"))
    row.status = status
    row.updated_at = now
    if status == "lost":
        _debit_dispute(session, row, payment.account_id, now)
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
            now=now,
        )
        row.recredit_entry_id = entry.id


_Handler = Callable[[Session, dict[str, Any], Settings, dt.datetime], None]
HANDLERS: dict[str, _Handler] = {
    "payment_intent.succeeded": _payment_intent_succeeded,
    "payment_intent.payment_failed": _payment_intent_failed,
    "checkout.session.completed": _checkout_completed,
    "checkout.session.async_payment_succeeded": _checkout_async_succeeded,
    "checkout.session.async_payment_failed": _checkout_async_failed,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute_created,
    "charge.dispute.closed": _dispute_closed,
}


def handle_event(
    session: Session, event: dict[str, Any], *, settings: Settings, now: dt.datetime
) -> bool:
    """Apply a verified Stripe event once; returns False for a repeat of one already applied.

    Event types we do not handle are recorded and ignored. Raises PaymentNotCredited (and any
    failure) for an event to be retried: the caller must roll back and answer non-2xx.
    """
    event_id, event_type = event.get("id"), event.get("type")
    data = event.get("data")
    if (
        not isinstance(event_id, str)
        or not isinstance(event_type, str)
        or not isinstance(data, dict)
        or not isinstance(data.get("object"), dict)
    ):
        raise InvalidRequest("The body is not a Stripe event.")
    try:
        with session.begin_nested():
            session.add(StripeEvent(id=event_id, type=event_type, processed_at=now))
    except IntegrityError:
        return False
    handler = HANDLERS.get(event_type)
    if handler is not None:
        handler(session, data["object"], settings, now)
    return True


# Reconciliation


def reconcile(session: Session, *, settings: Settings, now: dt.datetime) -> list[str]:
    """Credit recent succeeded payments of ours that no webhook credited; returns their
    payment ids. Safe to run at any time and as often as wanted (each credits once)."""
    since = (now - dt.timedelta(hours=settings.stripe_reconcile_hours)).timestamp()
    credited = []
    for intent in stripe_api.recent_payment_intents(settings):
        if intent.get("status") != "succeeded" or int(intent.get("created") or 0) < since:
            continue
        if not (intent.get("metadata") or {}).get("account_id"):
            continue
        if _fulfil_intent(session, intent, now=now):
            credited.append(intent["id"])
    if settings.topup_mode == "checkout":
        for checkout in stripe_api.recent_checkout_sessions(settings):
            if (
                checkout.get("payment_status") != "paid"
                or int(checkout.get("created") or 0) < since
            ):
                continue
            if (checkout.get("metadata") or {}).get("account_id") and _fulfil_checkout(
                session, checkout, now=now
            ):
                credited.append(checkout["id"])
    for stripe_id in credited:
        log.warning("reconcile: credited %s, which no webhook had fulfilled", stripe_id)
    return credited


# Auto-recharge


def configure_auto_recharge(
    session: Session,
    *,
    account_id: str,
    enabled: bool,
    threshold_nanos: Nanos,
    amount_nanos: Nanos,
    daily_cap_nanos: Nanos | None,
    payment_method_id: str | None,
    settings: Settings,
    now: dt.datetime,
) -> AutoRecharge:
    """Set an account's auto-recharge. Enabling needs a card saved on the account's Stripe
    customer (``payment_method_id``). Raises InvalidRequest naming the field at fault."""
    get_account(session, account_id)
    if threshold_nanos < 0:
        raise InvalidRequest("threshold_usd must not be negative.", param="threshold_usd")
    check_top_up_amount(amount_nanos, settings)
    cap = settings.auto_recharge_daily_cap if daily_cap_nanos is None else daily_cap_nanos
    if cap < amount_nanos:
        raise InvalidRequest("daily_cap_usd must be at least amount_usd.", param="daily_cap_usd")
    nanos_to_cents(cap, param="daily_cap_usd")
    if enabled:
        if not payment_method_id:
            raise InvalidRequest(
                "payment_method_id is required to enable auto-recharge.", param="payment_method_id"
            )
        customer_id = ensure_customer(session, account_id, settings=settings, now=now)
        if stripe_api.payment_method_customer(settings, payment_method_id) != customer_id:
            raise InvalidRequest(
                f"payment_method_id is not a card saved on this account's Stripe customer"
                f" ({customer_id}).",
                param="payment_method_id",
            )
    config = session.get(AutoRecharge, account_id)
    if config is None:
        config = AutoRecharge(account_id=account_id, consecutive_failures=0)
        session.add(config)
    config.enabled = enabled
    config.threshold_nanos = threshold_nanos
    config.amount_nanos = amount_nanos
    config.daily_cap_nanos = cap
    config.payment_method_id = payment_method_id or config.payment_method_id
    if enabled:
        # An operator re-enabling after declines (a new card, say) lifts the back-off.
        config.consecutive_failures = 0
        config.retry_after = None
    config.updated_at = now
    session.flush()
    return config


def get_auto_recharge(session: Session, account_id: str) -> AutoRecharge | None:
    """The account's auto-recharge settings, if any were set (AccountNotFound if no account)."""
    get_account(session, account_id)
    return session.get(AutoRecharge, account_id)


def _charged_today(session: Session, account_id: str, now: dt.datetime) -> int:
    midnight = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    total = session.scalar(
        select(func.coalesce(func.sum(Payment.amount_cents), 0)).where(
            Payment.account_id == account_id,
            Payment.source == Source.AUTO_RECHARGE,
            Payment.status.in_([PaymentStatus.PENDING, PaymentStatus.SUCCEEDED]),
            Payment.created_at >= midnight,
        )
    )
    return int(total or 0)


def claim_auto_recharges(session: Session, *, now: dt.datetime) -> list[str]:
    """Open a pending auto-recharge payment for every account that needs one and may have one;
    returns their payment ids (to charge after this transaction commits).

    An account needs one when its available balance is below its threshold; it may have one
    when none of its charges is pending, its back-off has passed and the charge fits its daily
    cap. Pending charges whose run died before reaching Stripe are returned again.
    """
    due = session.scalars(
        select(AutoRecharge)
        .join(Account, Account.id == AutoRecharge.account_id)
        .where(
            AutoRecharge.enabled.is_(True),
            AutoRecharge.payment_method_id.is_not(None),
            Account.balance_nanos - Account.held_nanos < AutoRecharge.threshold_nanos,
        )
        .order_by(AutoRecharge.account_id)
        .with_for_update(of=AutoRecharge, skip_locked=True)
    ).all()
    claimed = []
    for config in due:
        if config.retry_after is not None and config.retry_after > now:
            continue
        cents = nanos_to_cents(config.amount_nanos)
        if _charged_today(session, config.account_id, now) + cents > nanos_to_cents(
            config.daily_cap_nanos
        ):
            log.info("auto-recharge of %s skipped: daily cap reached", config.account_id)
            continue
        payment = Payment(
            id=new_id("pay"),
            account_id=config.account_id,
            source=Source.AUTO_RECHARGE,
            mode="payment_intent",
            status=PaymentStatus.PENDING,
            amount_cents=cents,
            refunded_cents=0,
            created_at=now,
            updated_at=now,
        )
        payment.idempotency_key = f"auto-recharge-{payment.id}"
        try:
            with session.begin_nested():
                session.add(payment)
        except IntegrityError:
            continue  # one is pending already (the unique partial index)
        claimed.append(payment.id)
    lost = session.scalars(
        select(Payment.id).where(
            Payment.source == Source.AUTO_RECHARGE,
            Payment.status == PaymentStatus.PENDING,
            Payment.payment_intent_id.is_(None),
            Payment.created_at < now - LOST_CHARGE_AFTER,
        )
    ).all()
    return claimed + [payment_id for payment_id in lost if payment_id not in claimed]


def charge_auto_recharge(
    transaction: Callable[[], AbstractContextManager[Session]],
    payment_id: str,
    *,
    settings: Settings,
    now: dt.datetime,
) -> str:
    """Charge a claimed auto-recharge off-session and record the outcome in a transaction of
    its own; returns the payment's status. No transaction stays open across the Stripe call."""
    with transaction() as session:
        payment = session.get(Payment, payment_id)
        config = session.get(AutoRecharge, payment.account_id) if payment else None
        if payment is None or config is None or payment.status != PaymentStatus.PENDING:
            return payment.status if payment is not None else "missing"
        if not config.enabled or not config.payment_method_id:
            # Turned off between the claim and the charge: release the claim, charge nothing.
            payment.status = PaymentStatus.FAILED
            payment.failure_message = "auto-recharge was disabled"
            payment.updated_at = now
            return payment.status
        customer_id = ensure_customer(session, payment.account_id, settings=settings, now=now)
        payment_method_id = config.payment_method_id or ""
        cents = payment.amount_cents
        idempotency_key = payment.idempotency_key or f"auto-recharge-{payment.id}"
        metadata = {
            "account_id": payment.account_id,
            "payment_id": payment.id,
            "source": Source.AUTO_RECHARGE,
        }
    outcome = stripe_api.charge_off_session(
        settings,
        customer_id=customer_id,
        payment_method_id=payment_method_id,
        cents=cents,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    with transaction() as session:
        payment = _locked(session, Payment.id == payment_id)
        assert payment is not None
        intent = outcome.intent
        if intent is not None and payment.payment_intent_id is None:
            payment.payment_intent_id = intent["id"]
        if outcome.declined is not None:
            _fail(session, payment, message=outcome.declined, settings=settings, now=now)
        elif intent is not None and intent.get("status") == "succeeded":
            received = int(intent.get("amount_received") or intent.get("amount") or 0)
            _credit(
                session,
                payment,
                cents=received,
                charge_id=_id(intent.get("latest_charge")),
                now=now,
            )
        # Otherwise it is processing: payment_intent.succeeded or payment_failed settles it.
        return payment.status


def run_auto_recharge(
    transaction: Callable[[], AbstractContextManager[Session]],
    *,
    settings: Settings,
    clock: Callable[[], dt.datetime],
) -> int:
    """Claim and charge every auto-recharge due (beat runs it every minute); returns the
    number of charges attempted. A charge Stripe could not be reached for stays pending and is
    asked again, with the same idempotency key, on a later run."""
    with transaction() as session:
        claimed = claim_auto_recharges(session, now=clock())
    for payment_id in claimed:
        try:
            charge_auto_recharge(transaction, payment_id, settings=settings, now=clock())
        except stripe_api.StripeUnavailable:
            log.warning("auto-recharge %s: Stripe unavailable; retried on a later run", payment_id)
    return len(claimed)
