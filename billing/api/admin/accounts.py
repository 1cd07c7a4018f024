"""Accounts (``/admin/v1/accounts``): open one, list them, read one with its balance."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask_openapi3 import Tag
from pydantic import BaseModel, Field

from billing.accounts import accounts
from billing.accounts.accounts import Account, Funds
from billing.api import render, schemas
from billing.api.admin.blueprint import admin
from billing.core.money import format_usd
from billing.http.context import funds, now, session

TAGS = [Tag(name="Accounts")]


class AccountCreate(schemas.Body):
    name: schemas.Name
    email: str | None = Field(None, max_length=320)


class AccountOut(BaseModel):
    object: Literal["account"] = "account"
    id: str
    name: str
    email: str | None
    balance_usd: str
    held_usd: str
    available_usd: str
    created_at: dt.datetime


def account(row: Account, funds: Funds) -> AccountOut:
    """An account with its funds, open holds counted wherever they are (``Runtime.funds``)."""
    return AccountOut(
        id=row.id,
        name=row.name,
        email=row.email,
        balance_usd=format_usd(funds.balance_nanos),
        held_usd=format_usd(funds.held_nanos),
        available_usd=format_usd(funds.available_nanos),
        created_at=row.created_at,
    )


@admin.post("/accounts", tags=TAGS, responses={201: AccountOut})
def create_account(body: AccountCreate) -> tuple[dict[str, Any], int]:
    """Open an account with a zero balance."""
    row = accounts.create_account(session(), name=body.name, email=body.email, now=now())
    return account(row, row.funds()).model_dump(mode="json"), 201


@admin.get("/accounts", tags=TAGS, responses={200: schemas.Page[AccountOut]})
def list_accounts(query: schemas.PageQuery) -> dict[str, Any]:
    """Accounts, oldest first."""
    rows = accounts.list_accounts(
        session(), after=schemas.decode_cursor(query.cursor), limit=query.limit
    )
    return render.page(
        [account(row, funds(row)) for row in rows],
        query.limit,
        lambda item: item.id,
    )


@admin.get("/accounts/<account_id>", tags=TAGS, responses={200: AccountOut})
def get_account(path: schemas.AccountPath) -> dict[str, Any]:
    """An account with its balance, held and available amounts."""
    row = accounts.get_account(session(), path.account_id)
    return account(row, funds(row)).model_dump(mode="json")
