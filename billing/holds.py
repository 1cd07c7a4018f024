"""Holds: the worst-case cost of a request in flight, reserved against the account's balance.

Placed at authorize time, released when the request's usage is settled (same request id) or
when they expire. This module keeps the holds placed through PostgreSQL (the embedded default,
and the fallback when Redis is down); ``billing.hotpath`` keeps those placed through Redis.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from billing.db import Base


class Hold(Base):
    """A reservation of ``amount_nanos`` for one request, open until released or expired."""

    __tablename__ = "holds"
    __table_args__ = (
        Index(
            "ix_holds_open_expires_at",
            "expires_at",
            postgresql_where=text("released_at IS NULL"),
            sqlite_where=text("released_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(200), unique=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model_id: Mapped[str] = mapped_column(String(200))
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    released_at: Mapped[dt.datetime | None]
    release_reason: Mapped[str | None] = mapped_column(String(40))
