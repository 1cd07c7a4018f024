"""The audit log (``/admin/v1/audit-log``): every admin write, as the blueprint recorded it."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask_openapi3 import Tag
from pydantic import BaseModel

from billing.access import audit
from billing.access.audit import AuditEntry
from billing.api import render, schemas
from billing.api.admin.blueprint import admin
from billing.http.context import session

TAGS = [Tag(name="Audit")]


class AuditEntryOut(BaseModel):
    object: Literal["audit_entry"] = "audit_entry"
    id: int
    actor: str
    action: str
    target_id: str | None
    status: int
    request: dict[str, Any] | None
    created_at: dt.datetime


def audit_entry(row: AuditEntry) -> AuditEntryOut:
    return AuditEntryOut(
        id=row.id,
        actor=row.actor,
        action=row.action,
        target_id=row.target_id,
        status=row.status,
        request=row.request,
        created_at=row.created_at,
    )


@admin.get("/audit-log", tags=TAGS, responses={200: schemas.Page[AuditEntryOut]})
def list_audit_log(query: schemas.PageQuery) -> dict[str, Any]:
    """Every admin write, newest first."""
    rows = audit.entries(
        session(), before=schemas.decode_int_cursor(query.cursor), limit=query.limit
    )
    return render.page([audit_entry(row) for row in rows], query.limit, lambda item: item.id)
