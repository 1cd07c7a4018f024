"""Content-policy violations reported by the gateway, with when an operator cleared them.

Revision ID: 70ae7e143e2d
Revises: 10e63fef66c7
Create Date: 2026-11-22 05:51:28.382673
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import billing.core.db

revision: str = "70ae7e143e2d"
down_revision: str | None = "10e63fef66c7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "violations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.String(length=2000), nullable=True),
        sa.Column("reported_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_violations_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_violations_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_violations")),
        sa.UniqueConstraint("key_id", "request_id", name="uq_violations_key_id_request_id"),
    )
    op.create_index(op.f("ix_violations_account_id"), "violations", ["account_id"], unique=False)
    op.create_index(
        "ix_violations_key_id_reported_at", "violations", ["key_id", "reported_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_violations_key_id_reported_at", table_name="violations")
    op.drop_index(op.f("ix_violations_account_id"), table_name="violations")
    op.drop_table("violations")
