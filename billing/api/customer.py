"""The OpenAI-compatible endpoints customers call with their own ``sk-`` key."""

from __future__ import annotations

from typing import Any

from flask_openapi3 import APIBlueprint, Tag

from billing import catalog, keys
from billing.api import render, schemas
from billing.api.context import bearer_token, now, session, settings
from billing.auth import Unauthenticated

customer = APIBlueprint(
    "customer",
    __name__,
    url_prefix="/v1",
    abp_security=[{"customer": []}],
    abp_responses={401: schemas.ErrorOut},
)
TAGS = [Tag(name="Customer (OpenAI-compatible)")]


def authenticated_key() -> keys.ApiKey:
    """The caller's key; raises InvalidApiKey if it is unknown, revoked, disabled or expired."""
    secret = bearer_token()
    if secret is None:
        raise Unauthenticated(
            "Missing API key: send 'Authorization: Bearer sk-...'.", param="Authorization"
        )
    key = keys.find_key(session(), secret, hmac_key=settings().hmac_key)
    state = key.state_at(now())
    if keys.ENFORCEMENT[state].http_status == 401:
        raise keys.InvalidApiKey("Incorrect API key provided.", param="Authorization")
    return key


@customer.get("/models", tags=TAGS, responses={200: schemas.ModelList})
def list_models() -> dict[str, Any]:
    """The priced models, OpenAI-style, each with its price per million tokens."""
    authenticated_key()
    listings = catalog.list_models(session(), now=now(), priced_only=True)
    return {
        "object": "list",
        "data": [render.model(item).model_dump(mode="json") for item in listings],
    }
