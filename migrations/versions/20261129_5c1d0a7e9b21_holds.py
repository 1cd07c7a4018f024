"""Holds placed at authorize time, and the columns that count them and version the balance.

Revision ID: 5c1d0a7e9b21
Revises: 70ae7e143e2d
Create Date: 2026-11-29 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import billing.core.db

revision: str = "5c1d0a7e9b21"
down_revision: str | None = "70ae7e143e2d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(
            sa.Column("held_nanos", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.add_column(
            sa.Column("balance_version", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("held_nanos", sa.BigInteger(), server_default="0", nullable=False)
        )
    op.create_table(
        "holds",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("released_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("release_reason", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_holds_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_holds_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_holds")),
        sa.UniqueConstraint("request_id", name=op.f("uq_holds_request_id")),
    )
    op.create_index(op.f("ix_holds_account_id"), "holds", ["account_id"], unique=False)
    op.create_index(
        "ix_holds_open_expires_at",
        "holds",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("released_at IS NULL"),
        sqlite_where=sa.text("released_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_holds_open_expires_at", table_name="holds")
    op.drop_index(op.f("ix_holds_account_id"), table_name="holds")
    op.drop_table("holds")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("held_nanos")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("balance_version")
        batch.drop_column("held_nanos")
