"""Stripe payments: customers, payments, processed events, disputes, auto-recharge; the
gateway webhook types topup.succeeded and auto_recharge.failed.

Revision ID: 8b3e5f2a9c14
Revises: 5c1d0a7e9b21
Create Date: 2026-11-29 15:24:13.962439
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import billing.core.db

OLD_TYPES = "type IN ('key.state_changed', 'account.balance_low', 'account.balance_depleted')"
NEW_TYPES = (
    "type IN ('key.state_changed', 'account.balance_low', 'account.balance_depleted',"
    " 'topup.succeeded', 'auto_recharge.failed')"
)


revision: str = "8b3e5f2a9c14"
down_revision: str | None = "5c1d0a7e9b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("processed_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )
    op.create_table(
        "auto_recharges",
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("threshold_nanos", sa.BigInteger(), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("daily_cap_nanos", sa.BigInteger(), nullable=False),
        sa.Column("payment_method_id", sa.String(length=100), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("retry_after", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_failure", sa.String(length=500), nullable=True),
        sa.Column("updated_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_nanos > 0", name=op.f("ck_auto_recharges_amount_positive")),
        sa.CheckConstraint(
            "consecutive_failures >= 0", name=op.f("ck_auto_recharges_failures_not_negative")
        ),
        sa.CheckConstraint(
            "daily_cap_nanos >= amount_nanos", name=op.f("ck_auto_recharges_cap_fits_amount")
        ),
        sa.CheckConstraint(
            "threshold_nanos >= 0", name=op.f("ck_auto_recharges_threshold_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_auto_recharges_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_auto_recharges")),
    )
    op.create_table(
        "stripe_customers",
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("customer_id", sa.String(length=100), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_stripe_customers_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_stripe_customers")),
        sa.UniqueConstraint("customer_id", name=op.f("uq_stripe_customers_customer_id")),
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("payment_intent_id", sa.String(length=100), nullable=True),
        sa.Column("checkout_session_id", sa.String(length=100), nullable=True),
        sa.Column("charge_id", sa.String(length=100), nullable=True),
        sa.Column("refunded_cents", sa.BigInteger(), nullable=False),
        sa.Column(
            "credit_entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("failure_message", sa.String(length=500), nullable=True),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(status = 'succeeded') = (credit_entry_id IS NOT NULL)",
            name=op.f("ck_payments_credited_iff_succeeded"),
        ),
        sa.CheckConstraint(
            "mode IN ('payment_intent', 'checkout')", name=op.f("ck_payments_mode_known")
        ),
        sa.CheckConstraint(
            "source IN ('top_up', 'auto_recharge')", name=op.f("ck_payments_source_known")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'failed')", name=op.f("ck_payments_status_known")
        ),
        sa.CheckConstraint("amount_cents > 0", name=op.f("ck_payments_amount_positive")),
        sa.CheckConstraint("refunded_cents >= 0", name=op.f("ck_payments_refunded_not_negative")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_payments_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["credit_entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_payments_credit_entry_id_ledger_entries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
        sa.UniqueConstraint("charge_id", name=op.f("uq_payments_charge_id")),
        sa.UniqueConstraint("checkout_session_id", name=op.f("uq_payments_checkout_session_id")),
        sa.UniqueConstraint("credit_entry_id", name=op.f("uq_payments_credit_entry_id")),
        sa.UniqueConstraint("payment_intent_id", name=op.f("uq_payments_payment_intent_id")),
    )
    op.create_index(op.f("ix_payments_account_id"), "payments", ["account_id"], unique=False)
    op.create_index(
        "ix_payments_one_pending_auto_recharge",
        "payments",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text("source = 'auto_recharge' AND status = 'pending'"),
        sqlite_where=sa.text("source = 'auto_recharge' AND status = 'pending'"),
    )
    op.create_table(
        "stripe_disputes",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("payment_id", sa.String(length=40), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=40), nullable=False),
        sa.Column(
            "debit_entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "recredit_entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_cents > 0", name=op.f("ck_stripe_disputes_amount_positive")),
        sa.ForeignKeyConstraint(
            ["debit_entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_stripe_disputes_debit_entry_id_ledger_entries"),
        ),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_stripe_disputes_payment_id_payments")
        ),
        sa.ForeignKeyConstraint(
            ["recredit_entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_stripe_disputes_recredit_entry_id_ledger_entries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_disputes")),
    )
    op.create_index(
        op.f("ix_stripe_disputes_payment_id"), "stripe_disputes", ["payment_id"], unique=False
    )
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_constraint(op.f("ck_webhook_events_type_known"), type_="check")
        batch.create_check_constraint(op.f("ck_webhook_events_type_known"), sa.text(NEW_TYPES))


def downgrade() -> None:
    # Events of the new types cannot be kept under the old constraint.
    op.execute(
        "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT d.id FROM webhook_deliveries d"
        " JOIN webhook_events e ON e.id = d.event_id"
        " WHERE e.type IN ('topup.succeeded', 'auto_recharge.failed'))"
    )
    op.execute(
        "DELETE FROM webhook_deliveries WHERE event_id IN (SELECT id FROM webhook_events"
        " WHERE type IN ('topup.succeeded', 'auto_recharge.failed'))"
    )
    op.execute(
        "DELETE FROM webhook_events WHERE type IN ('topup.succeeded', 'auto_recharge.failed')"
    )
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_constraint(op.f("ck_webhook_events_type_known"), type_="check")
        batch.create_check_constraint(op.f("ck_webhook_events_type_known"), sa.text(OLD_TYPES))
    op.drop_index(op.f("ix_stripe_disputes_payment_id"), table_name="stripe_disputes")
    op.drop_table("stripe_disputes")
    op.drop_index(
        "ix_payments_one_pending_auto_recharge",
        table_name="payments",
        postgresql_where=sa.text("source = 'auto_recharge' AND status = 'pending'"),
        sqlite_where=sa.text("source = 'auto_recharge' AND status = 'pending'"),
    )
    op.drop_index(op.f("ix_payments_account_id"), table_name="payments")
    op.drop_table("payments")
    op.drop_table("stripe_customers")
    op.drop_table("auto_recharges")
    op.drop_table("stripe_events")
