"""Gateway tokens (``/admin/v1/gateway-tokens``): create, list and revoke the gateway's
credentials."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask_openapi3 import Tag
from pydantic import BaseModel, Field

from billing.access import auth
from billing.access.auth import Role, ServiceToken
from billing.api import render, schemas
from billing.api.admin.blueprint import admin
from billing.http.context import now, session, settings
from billing.runtime import current_runtime

TAGS = [Tag(name="Gateway tokens")]


class TokenCreate(schemas.Body):
    name: schemas.Name


class TokenOut(BaseModel):
    object: Literal["gateway_token"] = "gateway_token"
    id: str
    name: str
    masked_token: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class TokenWithSecret(TokenOut):
    token: str = Field(description="The secret token. Shown only in this response; store it now.")


class TokenPath(BaseModel):
    token_id: str


def token(row: ServiceToken) -> TokenOut:
    return TokenOut(
        id=row.id,
        name=row.name,
        masked_token=f"{row.display_prefix}...{row.last4}",
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def token_with_secret(row: ServiceToken, secret: str) -> TokenWithSecret:
    return TokenWithSecret(**token(row).model_dump(), token=secret)


@admin.post("/gateway-tokens", tags=TAGS, responses={201: TokenWithSecret})
def create_gateway_token(body: TokenCreate) -> tuple[dict[str, Any], int]:
    """Create a token for a gateway. The secret `token` is in this response only."""
    row, secret = auth.create_token(
        session(), role=Role.GATEWAY, name=body.name, hmac_key=settings().hmac_key, now=now()
    )
    return token_with_secret(row, secret).model_dump(mode="json"), 201


@admin.get("/gateway-tokens", tags=TAGS, responses={200: schemas.Page[TokenOut]})
def list_gateway_tokens() -> dict[str, Any]:
    """Every gateway token (masked), revoked ones included."""
    return render.single_page(
        [token(row) for row in auth.list_tokens(session(), role=Role.GATEWAY)]
    )


@admin.post("/gateway-tokens/<token_id>/revoke", tags=TAGS, responses={200: TokenOut})
def revoke_gateway_token(path: TokenPath) -> dict[str, Any]:
    """Revoke a gateway token; it is refused from now on (by other API processes, which
    remember accepted tokens briefly, within 10 seconds)."""
    row = auth.revoke_token(session(), path.token_id, role=Role.GATEWAY, now=now())
    current_runtime().gateway_actors.clear()
    return token(row).model_dump(mode="json")
