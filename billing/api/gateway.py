"""The gateway API (``/gateway/v1``): what the proxy in front of the models calls.

Every route requires a gateway bearer token, checked before anything else.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import pydantic
from flask import Response, g, jsonify
from flask_openapi3 import APIBlueprint, Tag
from flask_openapi3.models import Schema
from flask_openapi3.utils import OPENAPI3_REF_PREFIX
from pydantic import BaseModel, Discriminator, Field, TypeAdapter

from billing.access.auth import Role
from billing.accounts import keys, violations
from billing.accounts.key_states import ENFORCEMENT, KeyState
from billing.accounts.keys import KeyStateChange
from billing.accounts.violations import Reported
from billing.api import schemas
from billing.catalog.usage import MAX_TOKENS
from billing.core import metrics
from billing.core.errors import BillingError, InvalidRequest
from billing.core.money import format_usd
from billing.enforcement.authorize import Authorization, AuthorizeRequest
from billing.enforcement.rate_limits import RateWindow
from billing.http.context import authenticated, bearer_token, now, session, settings
from billing.http.errors import error_detail, json_body
from billing.metering import usage_events
from billing.runtime import current_runtime

gateway = APIBlueprint(
    "gateway",
    __name__,
    url_prefix="/gateway/v1",
    abp_security=[{"gateway": []}],
    abp_responses={**schemas.ANY_ROUTE_ERRORS, 401: schemas.ErrorOut, 429: schemas.ErrorOut},
)
TAGS = [Tag(name="Gateway")]


@gateway.before_request
def _authenticate() -> None:
    config = settings()
    bootstrap = config.billing_gateway_token
    g.actor = authenticated(
        Role.GATEWAY,
        lambda: current_runtime().gateway_actors.authenticate(
            session,
            bearer_token(),
            role=Role.GATEWAY,
            bootstrap=bootstrap.get_secret_value() if bootstrap else None,
            hmac_key=config.hmac_key,
        ),
    )


# Authorize


class AuthorizeIn(schemas.Input):
    """A request about to be sent upstream, with what its cost can be estimated from."""

    api_key: str = Field(max_length=200, description="The customer's key, `sk-...`.")
    model: str = Field(max_length=200, examples=["doubao-seed-2-0-lite"])
    request_id: str = Field(
        min_length=1,
        max_length=200,
        description="The id its usage will be reported with: minted by the gateway, unique per"
        " upstream request, never taken from the client.",
    )
    input_tokens: int = Field(
        0,
        ge=0,
        le=MAX_TOKENS,
        description="Estimated input tokens, including the gateway's own estimate for images,"
        " audio and video.",
    )
    input_bytes: int = Field(
        0,
        ge=0,
        le=MAX_TOKENS,
        description="UTF-8 length of the request's text: an upper bound on its input tokens"
        " with byte-level BPE tokenizers. The hold covers max(input_tokens, input_bytes).",
    )
    max_output_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Default: the model's max_output_tokens."
    )
    clip: bool = Field(
        True,
        description="When the whole hold does not fit, grant the most output tokens that do (at"
        " least HOLD_MIN_OUTPUT_TOKENS); false: all or nothing.",
    )

    def request(self) -> AuthorizeRequest:
        return AuthorizeRequest(
            api_key=self.api_key,
            model=self.model,
            request_id=self.request_id,
            input_tokens=self.input_tokens,
            input_bytes=self.input_bytes,
            max_output_tokens=self.max_output_tokens,
            clip=self.clip,
        )


class RateLimitOut(BaseModel):
    """The key's rate limit now, for `x-ratelimit-*` headers."""

    limit: int = Field(description="Requests allowed per window.")
    remaining: int = Field(description="Requests left in the window now.")
    reset_seconds: int = Field(
        description="Seconds until the oldest request counted leaves the window (the window's"
        " length when none is counted)."
    )


class AuthorizeOut(BaseModel):
    allow: Literal[True] = True
    key_id: str
    account_id: str
    hold_id: str
    hold_usd: str = Field(description="The worst-case cost reserved for this request.")
    available_usd: str = Field(description="What the account has left to hold after this one.")
    expires_at: dt.datetime = Field(description="When the hold lapses if no usage settles it.")
    max_output_tokens: int = Field(
        description="Output tokens the hold covers (at most those asked for): pass it upstream"
        " as max_tokens / max_output_tokens."
    )
    clipped: bool = Field(description="The hold covers fewer output tokens than asked for.")
    state: Literal["active"] = Field(description="Always active: any other state is refused.")
    rate_limit: RateLimitOut | None = Field(
        description="The rate limit after this request; null: the key has none."
    )
    monthly_cap_usd: str | None = Field(description="The key's monthly cap; null: none.")
    month_spend_usd: str | None = Field(
        description="Settled spend this UTC month (without open holds); null when uncapped."
    )


@gateway.post(
    "/authorize",
    tags=TAGS,
    responses={
        200: AuthorizeOut,
        402: schemas.ErrorOut,
        403: schemas.ErrorOut,
        409: schemas.ErrorOut,
        429: schemas.ErrorOut,
        451: schemas.ErrorOut,
    },
)
def authorize(body: AuthorizeIn) -> dict[str, Any]:
    """May this key make this request? If so, hold its worst-case cost.

    The hold is max(`input_tokens`, `input_bytes`) at the input price plus `max_output_tokens`
    at the dearer of the output and reasoning prices, reserved against the available balance
    (balance minus open holds). When it does not fit, it is clipped to the most output tokens
    that do (at least `HOLD_MIN_OUTPUT_TOKENS`) unless `clip` is false; the answer's
    `max_output_tokens` is what the hold covers. It is released when usage with the same
    `request_id` settles (charging the actual cost, even beyond the hold), when the gateway
    releases it, or after `HOLD_TTL_SECONDS`. The same `request_id` with the same parameters
    answers the same hold; with others, 409 `request_id_conflict`. Refusals are OpenAI-shaped,
    for the gateway to relay: 401 `invalid_api_key`, 451 `content_policy_violation`, 402
    `insufficient_balance` (nothing is available) or `hold_exceeds_available` (param
    `max_output_tokens`, the message names the most output tokens affordable), 429
    `monthly_quota_exceeded` or `rate_limit_exceeded` (both with `Retry-After`), 403
    `model_not_allowed`, 400 `model_not_found`; when several apply, the first in this list.

    Served by `billing.api.hot` without Flask whenever Redis and memory can answer.
    """
    try:
        result = current_runtime().authorizer.authorize(session, body.request(), now=now())
    except BillingError as exc:
        metrics.count_authorize(exc.status, exc.code, path="app")
        raise
    metrics.count_authorize(200, ALLOWED, path="app")
    return authorized(result)


ALLOWED = "allowed"
"""The code an allowing authorize is counted under (``billing_authorize_decisions_total``)."""


def authorized(result: Authorization) -> dict[str, Any]:
    """The 200 answer of authorize (``AuthorizeOut``)."""
    cap, spend = result.monthly_cap_nanos, result.month_spend_nanos
    return {
        "allow": True,
        "key_id": result.key_id,
        "account_id": result.account_id,
        "hold_id": result.hold_id,
        "hold_usd": format_usd(result.hold_nanos),
        "available_usd": format_usd(result.available_nanos),
        "expires_at": result.expires_at.isoformat().replace("+00:00", "Z"),
        "max_output_tokens": result.output_tokens,
        "clipped": result.clipped,
        "state": KeyState.ACTIVE.value,
        "rate_limit": rate_limit(result.rate_window),
        "monthly_cap_usd": None if cap is None else format_usd(cap),
        "month_spend_usd": None if cap is None else format_usd(spend or 0),
    }


def rate_limit(window: RateWindow | None) -> dict[str, int] | None:
    """A rate window as ``RateLimitOut``, or None for a key without a limit."""
    if window is None:
        return None
    return {
        "limit": window.limit,
        "remaining": window.remaining,
        "reset_seconds": window.reset_seconds,
    }


# Usage


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


def report_shape(body: Any) -> Literal["event", "batch"]:
    """``"batch"`` for ``{"events": [...]}``, else ``"event"``: how report_usage reads a body."""
    return "batch" if isinstance(body, dict) and "events" in body else "event"


# The body of POST /usage, for the OpenAPI document only: the view hands the raw JSON to ingest,
# which judges each item on its own, so that one bad item is rejected in the answer instead of
# failing the batch (as validating through these models would), and parses it only once.
UsageReportIn = Annotated[
    Annotated[UsageEventIn, pydantic.Tag("event")] | Annotated[UsageBatchIn, pydantic.Tag("batch")],
    Discriminator(report_shape),
]


def _request_body(shape: Any) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a JSON ``shape``, generated by pydantic; the models it refers
    to join the blueprint's components."""
    schema = TypeAdapter(shape).json_schema(ref_template=f"{OPENAPI3_REF_PREFIX}/{{model}}")
    for name, definition in schema.pop("$defs", {}).items():
        gateway.components_schemas[name] = Schema(**definition)
    return {"required": True, "content": {"application/json": {"schema": schema}}}


@gateway.post(
    "/usage",
    tags=TAGS,
    responses={202: UsageAccepted, 409: schemas.ErrorOut},
    openapi_extensions={"requestBody": _request_body(UsageReportIn)},
)
def report_usage() -> Response | tuple[Response, int]:
    """Report usage: one event, or `{"events": [...]}` with up to 1000.

    Stored durably before the 202. Each item is accepted, a duplicate (same request id and
    content), or rejected with the reason; bad items never sink the good ones. An item whose
    request id has an open hold of another key is rejected with `request_id_conflict`. A
    single event that is rejected is answered with its error instead.
    """
    body = json_body()
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    batch = report_shape(body) == "batch"
    items = body["events"] if batch else [body]
    if not isinstance(items, list):
        raise InvalidRequest("events must be a list of usage events.", param="events")
    if len(items) > usage_events.MAX_BATCH:
        raise InvalidRequest(
            f"events holds at most {usage_events.MAX_BATCH} events; send the rest separately.",
            param="events",
        )
    result = usage_events.ingest(
        session(),
        items,
        prefix_items=batch,
        hmac_key=settings().hmac_key,
        max_age=settings().usage_max_age,
        now=now(),
        hold_keys=lambda request_ids: current_runtime().hold_keys(session(), request_ids),
    )
    metrics.count_usage(
        accepted=result.accepted, duplicates=result.duplicates, rejected=len(result.rejected)
    )
    if not batch and result.rejected:
        raise result.rejected[0].error
    answer = {
        "object": "usage_report",
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "rejected": [
            {
                "index": rejection.index,
                "request_id": rejection.request_id,
                "error": error_detail(rejection.error),
            }
            for rejection in result.rejected
        ],
    }
    return jsonify(answer), 202


# Violations


class ViolationReport(schemas.Body):
    """A content-policy violation the gateway detected in a request made with a key."""

    request_id: str = Field(
        min_length=1, max_length=200, description="The request; a repeat is a duplicate."
    )
    api_key: str | None = Field(None, description="The customer's key (or send key_id).")
    key_id: str | None = None
    category: str = Field(min_length=1, max_length=64, examples=["violence"])
    detail: str | None = Field(None, max_length=2000)


class ViolationReported(BaseModel):
    object: Literal["violation"] = "violation"
    id: int
    key_id: str
    state: str = Field(description="The key's state after the report.")
    suspended: bool = Field(
        description="The key is suspended for violations (its state is `suspended` unless a "
        "state of higher precedence, such as `revoked`, applies)."
    )
    duplicate: bool = Field(description="This request id was already reported for this key.")


def violation_reported(result: Reported, *, now: dt.datetime) -> ViolationReported:
    return ViolationReported(
        id=result.violation.id,
        key_id=result.key.id,
        state=result.key.state_at(now),
        suspended=result.key.suspended_at is not None,
        duplicate=result.duplicate,
    )


@gateway.post("/violations", tags=TAGS, responses={202: ViolationReported})
def report_violation(body: ViolationReport) -> tuple[dict[str, Any], int]:
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
    return violation_reported(result, now=at).model_dump(mode="json"), 202


# The key-state feed


class KeyStateFeedQuery(BaseModel):
    limit: int = Field(100, ge=1, le=1000, description="Changes per page (1-1000).")
    cursor: str | None = Field(
        None,
        max_length=schemas.MAX_CURSOR_LENGTH,
        description="The `next_cursor` of the previous page; omitted: from the beginning.",
    )


class KeyStateChangeOut(BaseModel):
    object: Literal["key_state_change"] = "key_state_change"
    id: int
    key_id: str
    account_id: str
    old_state: str | None
    new_state: str
    http_status: int
    code: str | None = Field(description="The `error.code` of `new_state`; null for active.")
    sequence: int = Field(
        description="The key's event sequence, as its webhooks carry it (increasing per key)."
    )
    reason: str
    changed_at: dt.datetime


class KeyStateFeed(BaseModel):
    """Key-state changes in order. `next_cursor` is never null: it is where to resume."""

    object: Literal["list"] = "list"
    data: list[KeyStateChangeOut]
    next_cursor: str
    has_more: bool = Field(description="True: fetch the next page now; false: poll later.")


def key_state_change(row: KeyStateChange, account_id: str) -> KeyStateChangeOut:
    enforcement = ENFORCEMENT[KeyState(row.new_state)]
    return KeyStateChangeOut(
        id=row.id,
        key_id=row.key_id,
        account_id=account_id,
        old_state=row.old_state,
        new_state=row.new_state,
        http_status=enforcement.http_status,
        code=enforcement.code,
        sequence=row.sequence,
        reason=row.reason,
        changed_at=row.created_at,
    )


@gateway.get("/key-states", tags=TAGS, responses={200: KeyStateFeed})
def key_states(query: KeyStateFeedQuery) -> dict[str, Any]:
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
            key_state_change(change, account_id).model_dump(mode="json")
            for change, account_id in rows
        ],
        "next_cursor": schemas.encode_cursor(position),
        "has_more": len(rows) == query.limit,
    }
