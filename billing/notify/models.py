"""The webhook tables: endpoints, the event outbox, deliveries and their attempts (DESIGN 6.4).

Invariants kept by the database too:
- An event's type is one of ``EventType``; a delivery's status one of ``DeliveryStatus``.
- A delivery has a next attempt exactly while it is pending, and never a negative count of
  attempts.
- Every recorded attempt has an outcome: a status code or an error.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from billing.core.db import Base, BigIntId
from billing.core.ids import uuid7

MAX_URL_LENGTH = 2000


def new_message_id() -> str:
    """A new event id: ``msg_`` and the 32 hex digits of a UUIDv7, unique and time-ordered."""
    return "msg_" + uuid7().hex


class EventType(enum.StrEnum):
    """What an endpoint can subscribe to."""

    KEY_CREATED = "key.created"
    KEY_STATE_CHANGED = "key.state_changed"
    BALANCE_LOW = "account.balance_low"
    BALANCE_DEPLETED = "account.balance_depleted"
    TOPUP_SUCCEEDED = "topup.succeeded"
    AUTO_RECHARGE_FAILED = "auto_recharge.failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class WebhookEndpoint(Base):
    """A URL of a gateway that receives events of the types it subscribed to."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(String(MAX_URL_LENGTH))
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret_salt: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]
    disabled_at: Mapped[dt.datetime | None]


class WebhookEvent(Base):
    """One event to announce; its payload is the ``data`` of the signed body."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        CheckConstraint(
            "type IN ('key.created', 'key.state_changed', 'account.balance_low',"
            " 'account.balance_depleted', 'topup.succeeded', 'auto_recharge.failed')",
            name="type_known",
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    # The public id, sent as ``webhook-id``: globally unique (``msg_`` + a UUIDv7), and the
    # same on every attempt and replay, so receivers drop duplicates by it.
    message_id: Mapped[str] = mapped_column(String(40), unique=True, default=new_message_id)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime]


class WebhookDelivery(Base):
    """One event to one endpoint, until it succeeds or its retries run out."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="status_known"),
        CheckConstraint(
            "(status = 'pending') = (next_attempt_at IS NOT NULL)", name="pending_is_scheduled"
        ),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    replay_of: Mapped[int | None] = mapped_column(ForeignKey("webhook_deliveries.id"))
    status: Mapped[str] = mapped_column(String(12))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[dt.datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    delivered_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]

    event: Mapped[WebhookEvent] = relationship(lazy="joined", innerjoin=True)

    def give_up(self, error: str) -> None:
        """Mark the delivery failed for good, with ``error``: no attempt follows."""
        self.status = DeliveryStatus.FAILED
        self.next_attempt_at = None
        self.last_error = error


class WebhookAttempt(Base):
    """One HTTP request of a delivery and how it ended."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        CheckConstraint("status_code IS NOT NULL OR error IS NOT NULL", name="has_outcome"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempted_at: Mapped[dt.datetime]
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer)


def rfc3339(moment: dt.datetime) -> str:
    """An instant as RFC 3339 UTC, as every payload carries times."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
