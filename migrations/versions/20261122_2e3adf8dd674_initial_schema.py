"""Initial schema: accounts, keys, the price table, the ledger, service tokens, audit log.

Revision ID: 2e3adf8dd674
Revises:
Create Date: 2026-11-22 04:23:32.678725
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import billing.core.db

revision: str = "2e3adf8dd674"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("balance_nanos", sa.BigInteger(), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=200), nullable=False),
        sa.Column("target_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=True),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
    )
    op.create_table(
        "service_tokens",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("display_prefix", sa.String(length=16), nullable=False),
        sa.Column("last4", sa.String(length=4), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "role IN ('admin', 'gateway')", name=op.f("ck_service_tokens_role_known")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_service_tokens_token_hash")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("display_prefix", sa.String(length=16), nullable=False),
        sa.Column("last4", sa.String(length=4), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("rate_limit", sa.String(length=100), nullable=True),
        sa.Column("monthly_cap_nanos", sa.BigInteger(), nullable=True),
        sa.Column("allowed_models", sa.JSON(), nullable=True),
        sa.Column("expires_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("disabled_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("suspended_at", billing.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('revoked', 'disabled', 'expired', 'suspended', 'insufficient_balance', 'monthly_quota_exceeded', 'active')",
            name=op.f("ck_api_keys_state_known"),
        ),
        sa.CheckConstraint(
            "monthly_cap_nanos IS NULL OR monthly_cap_nanos >= 0",
            name=op.f("ck_api_keys_cap_not_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_api_keys_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_account_id"), "api_keys", ["account_id"], unique=False)
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=True),
        sa.Column("idempotency_key", sa.String(length=300), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(kind IN ('top_up', 'dispute_won') AND amount_nanos > 0) OR (kind IN ('usage', 'refund', 'dispute') AND amount_nanos < 0) OR (kind = 'adjustment' AND amount_nanos <> 0)",
            name=op.f("ck_ledger_entries_sign_matches_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_ledger_entries_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_ledger_entries_idempotency_key")),
    )
    op.create_index(
        op.f("ix_ledger_entries_account_id"), "ledger_entries", ["account_id"], unique=False
    )
    op.create_table(
        "model_aliases",
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_model_aliases_model_id_models")
        ),
        sa.PrimaryKeyConstraint("alias", name=op.f("pk_model_aliases")),
    )
    op.create_index(op.f("ix_model_aliases_model_id"), "model_aliases", ["model_id"], unique=False)
    op.create_table(
        "price_versions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("effective_from", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("input_nanos_per_m", sa.BigInteger(), nullable=False),
        sa.Column("output_nanos_per_m", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_nanos_per_m", sa.BigInteger(), nullable=True),
        sa.Column("reasoning_nanos_per_m", sa.BigInteger(), nullable=True),
        sa.Column("max_output_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "input_nanos_per_m >= 0 AND output_nanos_per_m >= 0 AND (cached_input_nanos_per_m IS NULL OR cached_input_nanos_per_m >= 0) AND (reasoning_nanos_per_m IS NULL OR reasoning_nanos_per_m >= 0)",
            name=op.f("ck_price_versions_prices_not_negative"),
        ),
        sa.CheckConstraint(
            "max_output_tokens IS NULL OR max_output_tokens > 0",
            name=op.f("ck_price_versions_max_output_positive"),
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_price_versions_model_id_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_versions")),
        sa.UniqueConstraint("model_id", "effective_from", name=op.f("uq_price_versions_model_id")),
    )
    op.create_table(
        "key_state_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("old_state", sa.String(length=32), nullable=True),
        sa.Column("new_state", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("created_at", billing.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_key_state_changes_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_state_changes")),
    )
    op.create_index(
        op.f("ix_key_state_changes_key_id"), "key_state_changes", ["key_id"], unique=False
    )

    _ledger_append_only()


def _ledger_append_only() -> None:
    """Refuse UPDATE and DELETE on ledger entries: corrections are new entries."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'ledger entries are append-only (% refused)', TG_OP;
            END $$
            """
        )
        op.execute(
            "CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries"
            " FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()"
        )
    else:
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER ledger_entries_no_{operation.lower()} BEFORE {operation}"
                " ON ledger_entries BEGIN"
                " SELECT RAISE(ABORT, 'ledger entries are append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER ledger_entries_append_only ON ledger_entries")
        op.execute("DROP FUNCTION ledger_entries_append_only()")
    op.drop_index(op.f("ix_key_state_changes_key_id"), table_name="key_state_changes")
    op.drop_table("key_state_changes")
    op.drop_table("price_versions")
    op.drop_index(op.f("ix_model_aliases_model_id"), table_name="model_aliases")
    op.drop_table("model_aliases")
    op.drop_index(op.f("ix_ledger_entries_account_id"), table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_index(op.f("ix_api_keys_account_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("service_tokens")
    op.drop_table("models")
    op.drop_table("audit_log")
    op.drop_table("accounts")
