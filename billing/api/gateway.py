"""The gateway API (``/gateway/v1``): what the proxy in front of the models calls.

Every route requires a gateway bearer token, checked before anything else.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask import Response, g, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from billing.access.auth import Role
from billing.accounts import keys, violations
from billing.api import render, schemas
from billing.api.context import bearer_token, now, session, settings
from billing.api.errors import json_body
from billing.catalog.usage import MAX_TOKENS
from billing.core.errors import InvalidRequest
from billing.core.money import format_usd
from billing.enforcement.authorize import Authorization, AuthorizeRequest
from billing.metering import usage_events
from billing.runtime import current_runtime

gateway = APIBlueprint(
    "gateway",
    __name__,
    url_prefix="/gateway/v1",
    abp_security=[{"gateway": []}],
    abp_responses={400: schemas.ErrorOut, 401: schemas.ErrorOut, 503: schemas.ErrorOut},
)
TAGS = [Tag(name="Gateway")]


class UsageEventIn(BaseModel):
    """One request's usage. Send `usage` as the upstream reported it, or the four counts."""

    request_id: str = Field(max_length=200, description="The idempotency key of the event.")
    api_key: str | None = Field(None, description="The customer's key (or send key_id).")
    key_id: str | None = None
    model: str = Field(examples=["doubao-seed-2-0-lite"])
    usage: dict[str, Any] | None = Field(
        None, description="A Chat Completions or Responses API usage object."
    )
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    occurred_at: dt.datetime | None = Field(None, description="Default: when we received it.")
    outcome: Literal["completed", "failed", "client_disconnected"] | None = "completed"


class UsageBatchIn(BaseModel):
    events: list[UsageEventIn] = Field(max_length=usage_events.MAX_BATCH)


class UsageRejection(BaseModel):
    index: int
    request_id: str | None
    error: schemas.ErrorDetail


class UsageAccepted(BaseModel):
    object: Literal["usage_report"] = "usage_report"
    accepted: int
    duplicates: int
    rejected: list[UsageRejection]


DOC_MODELS = (UsageEventIn, UsageBatchIn)
USAGE_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/UsageEventIn"},
                    {"$ref": "#/components/schemas/UsageBatchIn"},
                ]
            }
        }
    },
}


@gateway.before_request
def _authenticate() -> None:
    config = settings()
    bootstrap = config.billing_gateway_token
    g.actor = current_runtime().gateway_actors.authenticate(
        session,
        bearer_token(),
        role=Role.GATEWAY,
        bootstrap=bootstrap.get_secret_value() if bootstrap else None,
        hmac_key=config.hmac_key,
    )


class AuthorizeIn(BaseModel):
    """A request about to be sent upstream, with what its cost can be estimated from."""

    api_key: str = Field(max_length=200, description="The customer's key, `sk-...`.")
    model: str = Field(max_length=200, examples=["doubao-seed-2-0-lite"])
    request_id: str = Field(
        min_length=1, max_length=200, description="The id its usage will be reported with."
    )
    input_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="Estimated input tokens.")
    max_output_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Default: the model's max_output_tokens."
    )

    def request(self) -> AuthorizeRequest:
        return AuthorizeRequest(
            api_key=self.api_key,
            model=self.model,
            request_id=self.request_id,
            input_tokens=self.input_tokens,
            max_output_tokens=self.max_output_tokens,
        )


class AuthorizeOut(BaseModel):
    allow: Literal[True] = True
    key_id: str
    account_id: str
    hold_id: str
    hold_usd: str = Field(description="The worst-case cost reserved for this request.")
    available_usd: str = Field(description="What the account has left to hold after this one.")
    expires_at: dt.datetime = Field(description="When the hold lapses if no usage settles it.")


@gateway.post(
    "/authorize",
    tags=TAGS,
    responses={
        200: AuthorizeOut,
        402: schemas.ErrorOut,
        403: schemas.ErrorOut,
        429: schemas.ErrorOut,
        451: schemas.ErrorOut,
    },
)
def authorize(body: AuthorizeIn) -> dict[str, Any]:
    """May this key make this request? If so, hold its worst-case cost.

    The hold is the input tokens at the input price plus `max_output_tokens` at the dearer of
    the output and reasoning prices, reserved against the available balance (balance minus
    open holds). It is released when usage with the same `request_id` settles (charging the
    actual cost, even beyond the hold), or after `HOLD_TTL_SECONDS`. Refusals are
    OpenAI-shaped, for the gateway to relay: 401 `invalid_api_key`, 451
    `content_policy_violation`, 402 `insufficient_balance`, 429 `monthly_quota_exceeded` or
    `rate_limit_exceeded` (both with `Retry-After`), 403 `model_not_allowed`, 400
    `model_not_found`; when several apply, the first in this list.

    Served by `billing.api.hot` without Flask whenever Redis and memory can answer.
    """
    return authorized(current_runtime().authorizer.authorize(session, body.request(), now=now()))


def authorized(result: Authorization) -> dict[str, Any]:
    """The 200 answer of authorize (``AuthorizeOut``)."""
    return {
        "allow": True,
        "key_id": result.key_id,
        "account_id": result.account_id,
        "hold_id": result.hold_id,
        "hold_usd": format_usd(result.hold_nanos),
        "available_usd": format_usd(result.available_nanos),
        "expires_at": result.expires_at.isoformat().replace("+00:00", "Z"),
    }


@gateway.post(
    "/usage",
    tags=TAGS,
    responses={202: UsageAccepted, 409: schemas.ErrorOut},
    openapi_extensions={"requestBody": USAGE_BODY},
)
def report_usage() -> Response | tuple[Response, int]:
    """Report usage: one event, or `{"events": [...]}` with up to 1000.

    Stored durably before the 202. Each item is accepted, a duplicate (same request id and
    content), or rejected with the reason; bad items never sink the good ones. A single event
    that is rejected is answered with its error instead.
    """
    body = json_body()
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    batch = "events" in body
    items = body["events"] if batch else [body]
    if not isinstance(items, list):
        raise InvalidRequest("events must be a list of usage events.", param="events")
    if len(items) > usage_events.MAX_BATCH:
        raise InvalidRequest(
            f"events holds at most {usage_events.MAX_BATCH} events; send the rest separately.",
            param="events",
        )
    result = usage_events.ingest(
        session(), items, prefix_items=batch, hmac_key=settings().hmac_key, now=now()
    )
    if not batch and result.rejected:
        raise result.rejected[0].error
    answer = {
        "object": "usage_report",
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "rejected": [rejection.as_dict() for rejection in result.rejected],
    }
    return jsonify(answer), 202


@gateway.post("/violations", tags=TAGS, responses={202: schemas.ViolationReported})
def report_violation(body: schemas.ViolationReport) -> tuple[dict[str, Any], int]:
    """Report a content-policy violation in a request made with a key.

    Every report is recorded; when the key's violations within the configured window reach the
    threshold (default 3 in 24 hours), the key is suspended (451) until an operator clears it.
    Repeating a request id for the same key answers the first report with `duplicate: true`.
    """
    config = settings()
    at = now()
    result = violations.report(
        session(),
        request_id=body.request_id,
        api_key=body.api_key,
        key_id=body.key_id,
        category=body.category,
        detail=body.detail,
        policy=violations.Policy(
            threshold=config.violation_threshold,
            window=dt.timedelta(hours=config.violation_window_hours),
        ),
        hmac_key=config.hmac_key,
        now=at,
    )
    return render.violation_reported(result, now=at).model_dump(mode="json"), 202


@gateway.get("/key-states", tags=TAGS, responses={200: schemas.KeyStateFeed})
def key_states(query: schemas.KeyStateFeedQuery) -> dict[str, Any]:
    """Key-state changes after `cursor`, oldest first: catch up on missed webhooks.

    A change is listed once it is a minute old (so that a change still committing is never
    skipped); webhooks carry it at once. Resume from `next_cursor`, which is never null:
    at once while `has_more` is true, later when it is false.
    """
    after = schemas.decode_int_cursor(query.cursor)
    rows = keys.state_changes(session(), after=after, limit=query.limit, now=now())
    position = rows[-1][0].id if rows else after or 0
    return {
        "object": "list",
        "data": [
            render.key_state_change(change, account_id).model_dump(mode="json")
            for change, account_id in rows
        ],
        "next_cursor": schemas.encode_cursor(position),
        "has_more": len(rows) == query.limit,
    }
