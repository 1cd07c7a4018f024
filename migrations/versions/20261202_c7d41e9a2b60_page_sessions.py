"""Sessions of the customer page, kept on the server: the cookie carries only a token.

Revision ID: c7d41e9a2b60
Revises: 3f7a2c9d41e8
Create Date: 2026-12-02 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import billing.core.db

revision: str = "c7d41e9a2b60"
down_revision: str | None = "3f7a2c9d41e8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "page_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=True),
        sa.Column("key_hash", sa.String(length=64), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_page_sessions_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_page_sessions")),
    )
    op.create_index(op.f("ix_page_sessions_key_id"), "page_sessions", ["key_id"], unique=False)
    op.create_index(
        op.f("ix_page_sessions_created_at"), "page_sessions", ["created_at"], unique=False
    )
    op.create_index(
        op.f("ix_page_sessions_last_seen_at"), "page_sessions", ["last_seen_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_page_sessions_last_seen_at"), table_name="page_sessions")
    op.drop_index(op.f("ix_page_sessions_created_at"), table_name="page_sessions")
    op.drop_index(op.f("ix_page_sessions_key_id"), table_name="page_sessions")
    op.drop_table("page_sessions")
