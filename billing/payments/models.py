"""The payments tables: Stripe customers, payments, applied Stripe events, disputes and
auto-recharge settings (DESIGN 6.5, 7.2).

The database holds the payments invariants with the code (``billing.payments.fulfilment``,
``billing.payments.stripe_events``, ``billing.payments.auto_recharge``): a payment is credited
once (``credit_entry_id``, unique, set iff it succeeded), a PaymentIntent or Checkout Session id
belongs to one payment (unique), a Stripe event id is applied once (primary key), and an
account has at most one pending auto-recharge charge (a unique partial index).

Money crosses to Stripe in cents and back exactly (``billing.payments.stripe_api``).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from billing.core.db import Base
from billing.core.money import Nanos
from billing.payments.stripe_api import cents_to_nanos


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
