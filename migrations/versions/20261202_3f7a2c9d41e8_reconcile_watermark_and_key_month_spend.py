"""Incremental reconciliation (a watermark and per-account ledger checkpoints, indexes on the
settlement stamps of events and entries), each key's spend per month, and an index on the
rollups' day for reports over all accounts.

The three indexes are created with IF NOT EXISTS: on a large database, create them beforehand
with CREATE INDEX CONCURRENTLY under the same names (README, "Reconciliation"), and this
migration does not lock the tables while it builds them.

Revision ID: 3f7a2c9d41e8
Revises: 8b3e5f2a9c14
Create Date: 2026-12-02 06:21:07.866338
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import billing.core.db

revision: str = "3f7a2c9d41e8"
down_revision: str | None = "8b3e5f2a9c14"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SETTLED = "status = 'settled'"
BACKFILL_POSTGRESQL = """
    INSERT INTO key_month_spend (key_id, month, spend_nanos)
    SELECT key_id, CAST(date_trunc('month', day) AS date), sum(cost_nanos) FROM usage_rollups
    GROUP BY key_id, CAST(date_trunc('month', day) AS date) HAVING sum(cost_nanos) <> 0
"""
BACKFILL_SQLITE = """
    INSERT INTO key_month_spend (key_id, month, spend_nanos)
    SELECT key_id, date(day, 'start of month'), sum(cost_nanos) FROM usage_rollups
    GROUP BY key_id, date(day, 'start of month') HAVING sum(cost_nanos) <> 0
"""


def upgrade() -> None:
    op.create_table(
        "reconcile_watermarks",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("verified_through", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_reconcile_watermarks")),
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("entries_nanos", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_ledger_checkpoints_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_ledger_checkpoints")),
    )
    op.create_table(
        "key_month_spend",
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("spend_nanos", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_key_month_spend_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("key_id", "month", name=op.f("pk_key_month_spend")),
    )
    # The spend so far, from the rollups settlement kept until now (they hold every settled
    # event's cost by key and UTC day, and are far smaller than the events).
    op.execute(
        BACKFILL_POSTGRESQL if op.get_bind().dialect.name == "postgresql" else BACKFILL_SQLITE
    )
    op.create_index(
        op.f("ix_ledger_entries_created_at"),
        "ledger_entries",
        ["created_at"],
        unique=False,
        if_not_exists=True,
    )
    op.create_index(
        "ix_usage_events_settled",
        "usage_events",
        ["settled_at", "id"],
        unique=False,
        postgresql_where=sa.text(SETTLED),
        sqlite_where=sa.text(SETTLED),
        if_not_exists=True,
    )
    op.create_index(
        op.f("ix_usage_rollups_day"), "usage_rollups", ["day"], unique=False, if_not_exists=True
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_usage_rollups_day"), table_name="usage_rollups")
    op.drop_index("ix_usage_events_settled", table_name="usage_events")
    op.drop_index(op.f("ix_ledger_entries_created_at"), table_name="ledger_entries")
    op.drop_table("key_month_spend")
    op.drop_table("ledger_checkpoints")
    op.drop_table("reconcile_watermarks")
