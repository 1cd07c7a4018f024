"""API keys (``/admin/v1/keys``): issue, change, revoke, rotate and unsuspend them; a key's
violations."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Literal

from flask_openapi3 import Tag
from pydantic import AwareDatetime, BaseModel, Field

from billing.accounts import keys, violations
from billing.accounts.key_states import ENFORCEMENT
from billing.accounts.keys import ApiKey
from billing.accounts.violations import Violation
from billing.api import render, schemas
from billing.api.admin.blueprint import admin
from billing.core.errors import InvalidRequest
from billing.core.money import format_usd
from billing.http.context import now, session, settings

TAGS = [Tag(name="Keys")]


class KeyFields(schemas.Body):
    rate_limit: str | None = Field(
        None,
        description="`limits` syntax, e.g. `1 per 10 seconds` or `60/minute`; null for none. "
        "Omitted on creation: the configured default.",
        examples=["1 per 10 seconds"],
    )
    monthly_cap_nanos: schemas.UsdAmount | None = Field(None, alias="monthly_cap_usd")
    allowed_models: list[str] | None = Field(None, description="Model ids or aliases; null: all.")
    expires_at: AwareDatetime | None = Field(None, description="RFC 3339 with a UTC offset.")


class KeyCreate(KeyFields):
    name: schemas.Name


class KeyUpdate(KeyFields):
    name: schemas.Name | None = None
    disabled: bool | None = Field(None, description="Disable (401) or re-enable the key.")


class KeyOut(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    account_id: str
    name: str
    masked_key: str
    state: str
    http_status: int
    rate_limit: str | None
    monthly_cap_usd: str | None
    allowed_models: list[str] | None
    expires_at: dt.datetime | None
    created_at: dt.datetime


class KeyWithSecret(KeyOut):
    key: str = Field(description="The secret key. Shown only in this response; store it now.")


class KeyPath(BaseModel):
    key_id: str


class ViolationOut(BaseModel):
    object: Literal["violation"] = "violation"
    id: int
    key_id: str
    account_id: str
    request_id: str
    category: str
    detail: str | None
    reported_at: dt.datetime
    cleared_at: dt.datetime | None = Field(description="When an operator cleared it, if so.")


def key(row: ApiKey, *, now: dt.datetime) -> KeyOut:
    state = row.state_at(now)
    return KeyOut(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        masked_key=row.masked,
        state=state,
        http_status=ENFORCEMENT[state].http_status,
        rate_limit=row.rate_limit,
        monthly_cap_usd=None
        if row.monthly_cap_nanos is None
        else format_usd(row.monthly_cap_nanos),
        allowed_models=row.allowed_models,
        expires_at=row.expires_at,
        created_at=row.created_at,
    )


def key_with_secret(row: ApiKey, secret: str, *, now: dt.datetime) -> KeyWithSecret:
    return KeyWithSecret(**key(row, now=now).model_dump(), key=secret)


def violation(row: Violation) -> ViolationOut:
    return ViolationOut(
        id=row.id,
        key_id=row.key_id,
        account_id=row.account_id,
        request_id=row.request_id,
        category=row.category,
        detail=row.detail,
        reported_at=row.reported_at,
        cleared_at=row.cleared_at,
    )


@admin.post("/accounts/<account_id>/keys", tags=TAGS, responses={201: KeyWithSecret})
def create_key(path: schemas.AccountPath, body: KeyCreate) -> tuple[dict[str, Any], int]:
    """Issue a key. The secret `key` is in this response only."""
    rate_limit = (
        body.rate_limit if "rate_limit" in body.model_fields_set else settings().default_rate_limit
    )
    config = keys.KeySettings(
        name=body.name,
        rate_limit=rate_limit,
        monthly_cap_nanos=body.monthly_cap_nanos,
        allowed_models=body.allowed_models,
        expires_at=body.expires_at,
    )
    at = now()
    row, secret = keys.issue_key(
        session(), account_id=path.account_id, settings=config, hmac_key=settings().hmac_key, now=at
    )
    return key_with_secret(row, secret, now=at).model_dump(mode="json"), 201


@admin.get("/accounts/<account_id>/keys", tags=TAGS, responses={200: schemas.Page[KeyOut]})
def list_keys(path: schemas.AccountPath) -> dict[str, Any]:
    """The keys of an account (secrets masked)."""
    at = now()
    return render.single_page(
        [key(row, now=at) for row in keys.list_keys(session(), path.account_id)]
    )


@admin.get("/keys/<key_id>", tags=TAGS, responses={200: KeyOut})
def get_key(path: KeyPath) -> dict[str, Any]:
    """A key with its state and the HTTP status the gateway answers for it."""
    return key(keys.get_key(session(), path.key_id), now=now()).model_dump(mode="json")


@admin.patch("/keys/<key_id>", tags=TAGS, responses={200: KeyOut})
def update_key(path: KeyPath, body: KeyUpdate) -> dict[str, Any]:
    """Change a key's settings; fields left out keep their value. `disabled` turns it off or on."""
    row = keys.get_key(session(), path.key_id)
    given = body.model_fields_set
    current = keys.KeySettings(
        name=row.name,
        rate_limit=row.rate_limit,
        monthly_cap_nanos=row.monthly_cap_nanos,
        allowed_models=row.allowed_models,
        expires_at=row.expires_at,
    )
    if "name" in given and body.name is None:
        raise InvalidRequest("name must not be null.", param="name")
    changes: dict[str, Any] = {
        field: getattr(body, field)
        for field in ("name", "rate_limit", "monthly_cap_nanos", "allowed_models", "expires_at")
        if field in given
    }
    at = now()
    row = keys.update_key(
        session(),
        path.key_id,
        settings=dataclasses.replace(current, **changes),
        disabled=body.disabled,
        now=at,
    )
    return key(row, now=at).model_dump(mode="json")


@admin.post("/keys/<key_id>/revoke", tags=TAGS, responses={200: KeyOut})
def revoke_key(path: KeyPath) -> dict[str, Any]:
    """Revoke a key for good (401 from now on)."""
    at = now()
    return key(keys.revoke_key(session(), path.key_id, now=at), now=at).model_dump(mode="json")


@admin.post("/keys/<key_id>/rotate", tags=TAGS, responses={200: KeyWithSecret})
def rotate_key(path: KeyPath) -> dict[str, Any]:
    """Replace a key's secret; the old secret stops working at once. The new `key` is shown once."""
    at = now()
    row, secret = keys.rotate_key(session(), path.key_id, hmac_key=settings().hmac_key, now=at)
    return key_with_secret(row, secret, now=at).model_dump(mode="json")


@admin.post("/keys/<key_id>/unsuspend", tags=TAGS, responses={200: KeyOut})
def unsuspend_key(path: KeyPath) -> dict[str, Any]:
    """Lift a suspension for content violations and clear the key's violations; the key takes
    the state its other facts call for (e.g. 402 if the account is empty)."""
    at = now()
    row = violations.clear(session(), path.key_id, now=at)
    return key(row, now=at).model_dump(mode="json")


@admin.get("/keys/<key_id>/violations", tags=TAGS, responses={200: schemas.Page[ViolationOut]})
def list_violations(path: KeyPath, query: schemas.PageQuery) -> dict[str, Any]:
    """A key's reported violations, newest first, cleared ones included."""
    rows = violations.list_violations(
        session(),
        path.key_id,
        before=schemas.decode_int_cursor(query.cursor),
        limit=query.limit,
    )
    return render.page([violation(row) for row in rows], query.limit, lambda item: item.id)
