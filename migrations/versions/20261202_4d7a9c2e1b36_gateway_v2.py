"""Gateway contract v2: what holds keep for conflicts and clipping, key event sequences,
globally unique webhook event ids, and the key.created event type.

Revision ID: 4d7a9c2e1b36
Revises: c7d41e9a2b60
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

OLD_TYPES = (
    "type IN ('key.state_changed', 'account.balance_low', 'account.balance_depleted',"
    " 'topup.succeeded', 'auto_recharge.failed')"
)
NEW_TYPES = (
    "type IN ('key.created', 'key.state_changed', 'account.balance_low',"
    " 'account.balance_depleted', 'topup.succeeded', 'auto_recharge.failed')"
)

revision: str = "4d7a9c2e1b36"
down_revision: str | None = "c7d41e9a2b60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENDPOINTS = sa.table(
    "webhook_endpoints", sa.column("id", sa.String), sa.column("event_types", sa.JSON)
)


def _subscribe(old: str, new: str, *, add: bool) -> None:
    """Add ``new`` to the endpoints subscribed to ``old``, or remove it from every endpoint."""
    connection = op.get_bind()
    rows = connection.execute(sa.select(ENDPOINTS.c.id, ENDPOINTS.c.event_types)).all()
    for endpoint_id, types in rows:
        wanted = old in types if add else new in types
        if not wanted:
            continue
        changed = sorted({*types, new}) if add else [kind for kind in types if kind != new]
        connection.execute(
            ENDPOINTS.update().where(ENDPOINTS.c.id == endpoint_id).values(event_types=changed)
        )


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("output_tokens", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))

    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("event_sequence", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("key_state_changes") as batch:
        batch.add_column(sa.Column("sequence", sa.BigInteger(), nullable=True))
    # The changes so far, numbered per key in order; each key's counter at its last change.
    op.execute(
        "UPDATE key_state_changes SET sequence = (SELECT COUNT(*) FROM key_state_changes AS"
        " earlier WHERE earlier.key_id = key_state_changes.key_id"
        " AND earlier.id <= key_state_changes.id)"
    )
    op.execute(
        "UPDATE api_keys SET event_sequence = (SELECT COUNT(*) FROM key_state_changes"
        " WHERE key_state_changes.key_id = api_keys.id)"
    )
    with op.batch_alter_table("key_state_changes") as batch:
        batch.alter_column("sequence", existing_type=sa.BigInteger(), nullable=False)

    # Events already sent keep their webhook-id, so receivers still drop their replays.
    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("message_id", sa.String(length=40), nullable=True))
    op.execute("UPDATE webhook_events SET message_id = 'evt_' || CAST(id AS VARCHAR(20))")
    with op.batch_alter_table("webhook_events") as batch:
        batch.alter_column("message_id", existing_type=sa.String(length=40), nullable=False)
        batch.create_unique_constraint(op.f("uq_webhook_events_message_id"), ["message_id"])
        batch.drop_constraint(op.f("ck_webhook_events_type_known"), type_="check")
        batch.create_check_constraint(op.f("ck_webhook_events_type_known"), sa.text(NEW_TYPES))
    # Endpoints that heard of new keys through key.state_changed hear of them through
    # key.created now.
    _subscribe("key.state_changed", "key.created", add=True)


def downgrade() -> None:
    _subscribe("key.state_changed", "key.created", add=False)
    # Events of the new type cannot be kept under the old constraint.
    op.execute(
        "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT d.id FROM webhook_deliveries"
        " AS d JOIN webhook_events AS e ON e.id = d.event_id WHERE e.type = 'key.created')"
    )
    op.execute(
        "DELETE FROM webhook_deliveries WHERE event_id IN (SELECT id FROM webhook_events"
        " WHERE type = 'key.created')"
    )
    op.execute("DELETE FROM webhook_events WHERE type = 'key.created'")
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_constraint(op.f("ck_webhook_events_type_known"), type_="check")
        batch.create_check_constraint(op.f("ck_webhook_events_type_known"), sa.text(OLD_TYPES))
        batch.drop_constraint(op.f("uq_webhook_events_message_id"), type_="unique")
        batch.drop_column("message_id")
    with op.batch_alter_table("key_state_changes") as batch:
        batch.drop_column("sequence")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("event_sequence")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("request_hash")
        batch.drop_column("output_tokens")
