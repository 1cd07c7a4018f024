"""Usage events (durable ingest, settlement state) and daily usage rollups.

Revision ID: 45bd70a25a57
Revises: 2e3adf8dd674
Create Date: 2026-11-22 04:47:21.953894
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import billing.core.db

revision: str = "45bd70a25a57"
down_revision: str | None = "2e3adf8dd674"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("usage_raw", sa.JSON(), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=24), nullable=False),
        sa.Column("occurred_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("received_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=True),
        sa.Column(
            "price_version_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=True),
        sa.Column("cost_breakdown", sa.JSON(), nullable=True),
        sa.Column(
            "ledger_entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("settled_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'settled') = (cost_nanos IS NOT NULL AND price_version_id IS NOT NULL AND settled_at IS NOT NULL)",
            name=op.f("ck_usage_events_settled_has_price"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'settled', 'unpriced')",
            name=op.f("ck_usage_events_status_known"),
        ),
        sa.CheckConstraint(
            "cost_nanos IS NULL OR cost_nanos = 0 OR ledger_entry_id IS NOT NULL",
            name=op.f("ck_usage_events_charged_has_entry"),
        ),
        sa.CheckConstraint(
            "input_tokens >= 0 AND cached_tokens >= 0 AND output_tokens >= 0 AND reasoning_tokens >= 0 AND cached_tokens <= input_tokens AND reasoning_tokens <= output_tokens",
            name=op.f("ck_usage_events_token_subsets"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_usage_events_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_usage_events_key_id_api_keys")
        ),
        sa.ForeignKeyConstraint(
            ["ledger_entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_usage_events_ledger_entry_id_ledger_entries"),
        ),
        sa.ForeignKeyConstraint(
            ["price_version_id"],
            ["price_versions.id"],
            name=op.f("fk_usage_events_price_version_id_price_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_events")),
        sa.UniqueConstraint("request_id", name=op.f("uq_usage_events_request_id")),
    )
    op.create_index(
        "ix_usage_events_pending",
        "usage_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_usage_events_unpriced",
        "usage_events",
        ["model"],
        unique=False,
        postgresql_where=sa.text("status = 'unpriced'"),
        sqlite_where=sa.text("status = 'unpriced'"),
    )
    op.create_table(
        "usage_rollups",
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_usage_rollups_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_usage_rollups_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint(
            "account_id", "key_id", "model_id", "day", name=op.f("pk_usage_rollups")
        ),
    )


def downgrade() -> None:
    op.drop_table("usage_rollups")
    op.drop_index(
        "ix_usage_events_unpriced",
        table_name="usage_events",
        postgresql_where=sa.text("status = 'unpriced'"),
        sqlite_where=sa.text("status = 'unpriced'"),
    )
    op.drop_index(
        "ix_usage_events_pending",
        table_name="usage_events",
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.drop_table("usage_events")
