"""The ledger of an account (``/admin/v1/accounts/<account_id>/adjustments`` and ``/ledger``):
adjustments, and the entries."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask import g
from flask_openapi3 import Tag
from pydantic import BaseModel, Field

from billing.api import render, schemas
from billing.api.admin.blueprint import admin
from billing.core.money import format_usd
from billing.http.context import now, session, settings
from billing.ledger import ledger
from billing.ledger.ledger import LedgerEntry

TAGS = [Tag(name="Ledger")]


class AdjustmentCreate(schemas.Body):
    amount_nanos: schemas.UsdAmount = Field(
        alias="amount_usd", description="Positive credits the account, negative debits it."
    )
    reason: str = Field(min_length=1, max_length=500)


class IdempotencyHeader(schemas.Input):
    idempotency_key: str = Field(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Retry safely: the same key and body give the same answer.",
    )


class LedgerEntryOut(BaseModel):
    object: Literal["ledger_entry"] = "ledger_entry"
    id: int
    account_id: str
    kind: str
    amount_usd: str
    reason: str
    reference: str | None
    actor: str
    created_at: dt.datetime


def ledger_entry(row: LedgerEntry) -> LedgerEntryOut:
    return LedgerEntryOut(
        id=row.id,
        account_id=row.account_id,
        kind=row.kind,
        amount_usd=format_usd(row.amount_nanos),
        reason=row.reason,
        reference=row.reference,
        actor=row.actor,
        created_at=row.created_at,
    )


@admin.post(
    "/accounts/<account_id>/adjustments",
    tags=TAGS,
    responses={201: LedgerEntryOut, 200: LedgerEntryOut, 409: schemas.ErrorOut},
)
def create_adjustment(
    path: schemas.AccountPath, header: IdempotencyHeader, body: AdjustmentCreate
) -> tuple[dict[str, Any], int]:
    """Credit (positive) or debit (negative) an account, with a reason.

    Requires an `Idempotency-Key`: a retry with the same key and body answers the original entry
    (200) without moving money again; the same key with a different body answers 409.
    """
    entry, created = ledger.post(
        session(),
        ledger.Posting(
            account_id=path.account_id,
            kind=ledger.EntryKind.ADJUSTMENT,
            amount_nanos=body.amount_nanos,
            reason=body.reason,
            actor=g.actor,
            idempotency_key=f"adjustment:{path.account_id}:{header.idempotency_key}",
        ),
        low_balance_nanos=settings().balance_low_threshold,
        now=now(),
    )
    return ledger_entry(entry).model_dump(mode="json"), 201 if created else 200


@admin.get(
    "/accounts/<account_id>/ledger",
    tags=TAGS,
    responses={200: schemas.Page[LedgerEntryOut]},
)
def list_ledger(path: schemas.AccountPath, query: schemas.PageQuery) -> dict[str, Any]:
    """An account's ledger entries, newest first."""
    rows = ledger.entries(
        session(),
        path.account_id,
        before=schemas.decode_int_cursor(query.cursor),
        limit=query.limit,
    )
    return render.page([ledger_entry(row) for row in rows], query.limit, lambda item: item.id)
