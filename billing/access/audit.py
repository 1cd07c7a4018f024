"""The audit log: one row for every admin write, in the transaction of the write itself."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.core.db import Base, BigIntId, newest_first

# Request fields never copied into the log, whatever endpoint they come to.
SECRET_FIELDS = frozenset({"key", "token", "secret", "api_key", "password"})


class AuditEntry(Base):
    """Who changed what, when, and with which request."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(200))
    target_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[int] = mapped_column(Integer)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime]


def redact(body: Any) -> Any:
    """``body`` with every secret-bearing field replaced by ``"[redacted]"``."""
    if isinstance(body, dict):
        return {k: "[redacted]" if k in SECRET_FIELDS else redact(v) for k, v in body.items()}
    if isinstance(body, list):
        return [redact(item) for item in body]
    return body


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_id: str | None,
    status: int,
    request: Any,
    now: dt.datetime,
) -> None:
    """Append an audit entry (secrets in ``request`` are redacted first)."""
    session.add(
        AuditEntry(
            actor=actor,
            action=action,
            target_id=target_id,
            status=status,
            request=redact(request) if isinstance(request, dict) else None,
            created_at=now,
        )
    )


def entries(session: Session, *, before: int | None, limit: int) -> list[AuditEntry]:
    """Audit entries, newest first, starting before the entry id ``before``."""
    query = newest_first(select(AuditEntry), AuditEntry.id, before=before, limit=limit)
    return list(session.scalars(query))
