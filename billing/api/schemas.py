"""Request and response bodies of the HTTP API. The OpenAPI document is generated from these.

Money crosses the API as decimal strings in USD with fields ending in ``_usd``; a JSON number in a
money field is refused with a 400 that says to send a string.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
)

from billing.core.errors import InvalidRequest
from billing.core.money import MAX_AMOUNT_NANOS, MoneyFormatError, format_usd, parse_usd


def _refuse_numbers(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError('money is sent as a decimal string such as "10.00", not a JSON number')
    return value


def _exact_decimal(value: str) -> str:
    try:
        nanos = parse_usd(value)
    except MoneyFormatError as exc:
        raise ValueError(str(exc)) from None
    if abs(nanos) > MAX_AMOUNT_NANOS:
        raise ValueError(f"{value!r} is over the limit of {format_usd(MAX_AMOUNT_NANOS)} USD")
    return value


UsdAmount = Annotated[
    str,
    BeforeValidator(_refuse_numbers),
    AfterValidator(_exact_decimal),
    Field(description="USD as a decimal string, at most 9 decimal places.", examples=["10.00"]),
]
PriceAmount = Annotated[
    str,
    BeforeValidator(_refuse_numbers),
    AfterValidator(_exact_decimal),
    Field(description="USD per million tokens, as a decimal string.", examples=["0.39"]),
]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class Body(BaseModel):
    """A request body: unknown fields are refused rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``cursor`` for the next (null at the end)."""

    object: Literal["list"] = "list"
    data: list[T]
    next_cursor: str | None


class PageQuery(BaseModel):
    """Pagination parameters of every list."""

    limit: int = Field(20, ge=1, le=100, description="Items per page (1-100).")
    cursor: str | None = Field(None, description="The `next_cursor` of the previous page.")


def encode_cursor(position: str | int) -> str:
    """An opaque cursor for a list position."""
    return base64.urlsafe_b64encode(str(position).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    """The list position in ``cursor``; raises InvalidRequest if it is not one of ours."""
    if cursor is None:
        return None
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("cursor is not a cursor this API returned.", param="cursor") from None


def decode_int_cursor(cursor: str | None) -> int | None:
    """A numeric list position from ``cursor``; raises InvalidRequest."""
    position = decode_cursor(cursor)
    if position is None:
        return None
    if not position.isdigit():
        raise InvalidRequest("cursor is not a cursor this API returned.", param="cursor")
    return int(position)


# Accounts


class AccountCreate(Body):
    name: Name
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


class AccountPath(BaseModel):
    account_id: str


# Keys


class KeyFields(Body):
    rate_limit: str | None = Field(
        None,
        description="`limits` syntax, e.g. `1 per 10 seconds` or `60/minute`; null for none. "
        "Omitted on creation: the configured default.",
        examples=["1 per 10 seconds"],
    )
    monthly_cap_usd: UsdAmount | None = None
    allowed_models: list[str] | None = Field(None, description="Model ids or aliases; null: all.")
    expires_at: AwareDatetime | None = Field(None, description="RFC 3339 with a UTC offset.")


class KeyCreate(KeyFields):
    name: Name


class KeyUpdate(KeyFields):
    name: Name | None = None
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


# Violations


class ViolationReport(Body):
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


# Ledger


class AdjustmentCreate(Body):
    amount_usd: UsdAmount = Field(description="Positive credits the account, negative debits it.")
    reason: str = Field(min_length=1, max_length=500)


class IdempotencyHeader(BaseModel):
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


# Models and prices


class PriceVersionCreate(Body):
    id: str = Field(min_length=1, max_length=128, examples=["doubao-seed-2-0-lite"])
    input_price_per_m: PriceAmount
    output_price_per_m: PriceAmount
    cached_input_price_per_m: PriceAmount | None = Field(None, description="Default: input price.")
    reasoning_price_per_m: PriceAmount | None = Field(None, description="Default: output price.")
    max_output_tokens: StrictInt | None = Field(None, gt=0)
    effective_from: AwareDatetime | None = Field(
        None, description="Default: now. RFC 3339 with a UTC offset."
    )


class PricingOut(BaseModel):
    version_id: int
    effective_from: dt.datetime
    input_price_per_m: str
    output_price_per_m: str
    cached_input_price_per_m: str
    reasoning_price_per_m: str
    max_output_tokens: int | None


class ModelOut(BaseModel):
    object: Literal["model"] = "model"
    id: str
    created: int = Field(description="Unix time the model was added.")
    owned_by: str
    aliases: list[str]
    pricing: PricingOut | None = Field(description="The price in effect now; null if unpriced.")


class ModelPath(BaseModel):
    model_id: str


class AliasCreate(Body):
    alias: str = Field(min_length=1, max_length=128, examples=["doubao-seed-2.0-lite"])


class AliasOut(BaseModel):
    object: Literal["model_alias"] = "model_alias"
    alias: str
    model_id: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


# Audit


class AuditEntryOut(BaseModel):
    object: Literal["audit_entry"] = "audit_entry"
    id: int
    actor: str
    action: str
    target_id: str | None
    status: int
    request: dict[str, Any] | None
    created_at: dt.datetime


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorOut(BaseModel):
    """The OpenAI error shape every failure is answered with."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]


# Gateway tokens


class TokenCreate(Body):
    name: Name


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


# Usage


class UsageQueryIn(BaseModel):
    account_id: str | None = None
    key_id: str | None = None
    model: str | None = Field(None, description="A model id (after alias resolution).")
    start: dt.date | None = Field(None, alias="from", description="First UTC day, included.")
    end: dt.date | None = Field(None, alias="to", description="Last UTC day, included.")
    group_by: str = Field("day", description="Comma-separated: day, model, key, account.")
    format: Literal["json", "csv"] = "json"


class UsageRow(BaseModel):
    day: dt.date | None = None
    model: str | None = None
    key: str | None = None
    account: str | None = None
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str


class UsageReportOut(BaseModel):
    object: Literal["list"] = "list"
    group_by: list[str]
    data: list[UsageRow]


class UnpricedModelOut(BaseModel):
    object: Literal["unpriced_model"] = "unpriced_model"
    model: str
    events: int
    first_occurred_at: dt.datetime
    last_occurred_at: dt.datetime


class UnpricedList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UnpricedModelOut]


class UsageEventPath(BaseModel):
    request_id: str


class UsageEventOut(BaseModel):
    object: Literal["usage_event"] = "usage_event"
    request_id: str
    account_id: str
    key_id: str
    model: str = Field(description="As reported.")
    model_id: str | None = Field(description="The model it resolved to.")
    status: Literal["pending", "settled", "unpriced"]
    outcome: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    occurred_at: dt.datetime
    received_at: dt.datetime
    settled_at: dt.datetime | None
    price_version_id: int | None
    cost_usd: str | None
    breakdown: dict[str, str] | None = Field(
        description="input_usd, cached_usd, output_usd, reasoning_usd (exact) and total_usd."
    )
    ledger_entry_id: int | None


# Webhooks

WebhookEventType = Literal["key.state_changed", "account.balance_low", "account.balance_depleted"]


class WebhookEndpointCreate(Body):
    url: str = Field(
        min_length=1,
        max_length=2000,
        description="An http:// or https:// URL; each request to it is signed (Standard Webhooks).",
        examples=["https://gateway.example.com/billing-webhooks"],
    )
    event_types: list[WebhookEventType] | None = Field(
        None, description="The event types to receive; omitted or null: all of them."
    )


class WebhookEndpointOut(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    event_types: list[str]
    created_at: dt.datetime
    disabled_at: dt.datetime | None


class WebhookEndpointWithSecret(WebhookEndpointOut):
    secret: str = Field(
        description="The signing secret (`whsec_...`) for verifying our requests with a Standard"
        " Webhooks library. Shown only in this response; store it now."
    )


class WebhookEndpointPath(BaseModel):
    endpoint_id: str


class WebhookDeliveryOut(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: int
    event_id: str = Field(description="The `webhook-id` header of every attempt.")
    event_type: str
    endpoint_id: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: dt.datetime | None
    replay_of: int | None = Field(description="The delivery this one replays, if any.")
    created_at: dt.datetime


class WebhookAttemptOut(BaseModel):
    object: Literal["webhook_attempt"] = "webhook_attempt"
    id: int
    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class WebhookEventOut(BaseModel):
    object: Literal["webhook_event"] = "webhook_event"
    id: str
    type: str
    data: dict[str, Any]
    created_at: dt.datetime


class WebhookDeliveryDetail(WebhookDeliveryOut):
    event: WebhookEventOut
    attempt_log: list[WebhookAttemptOut] = Field(description="Every attempt, oldest first.")


class WebhookDeliveryPath(BaseModel):
    delivery_id: int


class WebhookDeliveryQuery(PageQuery):
    status: Literal["pending", "succeeded", "failed"] | None = None


# The key-state feed (gateway)


class KeyStateFeedQuery(BaseModel):
    limit: int = Field(100, ge=1, le=1000, description="Changes per page (1-1000).")
    cursor: str | None = Field(
        None, description="The `next_cursor` of the previous page; omitted: from the beginning."
    )


class KeyStateChangeOut(BaseModel):
    object: Literal["key_state_change"] = "key_state_change"
    id: int
    key_id: str
    account_id: str
    old_state: str | None
    new_state: str
    http_status: int
    reason: str
    changed_at: dt.datetime


class KeyStateFeed(BaseModel):
    """Key-state changes in order. `next_cursor` is never null: it is where to resume."""

    object: Literal["list"] = "list"
    data: list[KeyStateChangeOut]
    next_cursor: str
    has_more: bool = Field(description="True: fetch the next page now; false: poll later.")


# OpenAI-compatible billing (chat clients)
#
# These two bodies keep the shape of OpenAI's former dashboard endpoints, which chat clients
# (NextChat, LobeChat, One API front ends) still read: their amounts are JSON numbers, because
# those clients do arithmetic on them. They are the only money fields of this API that are not
# decimal strings; each is computed from exact nano-dollars and rounded once, at the end, to the
# nearest JSON number.

_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}", re.ASCII)


def _iso_day(value: object) -> object:
    if isinstance(value, str):
        if not _ISO_DAY.fullmatch(value):
            raise ValueError(f"{value!r} is not a date in the form YYYY-MM-DD")
        year, month, day = (int(part) for part in value.split("-"))
        try:
            return dt.date(year, month, day)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid date: {exc}") from None
    return value


IsoDay = Annotated[dt.date, BeforeValidator(_iso_day)]


class BillingUsageQuery(BaseModel):
    start_date: IsoDay = Field(description="First UTC day of the range, included (YYYY-MM-DD).")
    end_date: IsoDay = Field(
        description="UTC day after the last one, excluded (YYYY-MM-DD), as OpenAI's endpoint"
        " took it: clients pass tomorrow to include today. At most 100 days after start_date."
    )


class BillingPlan(BaseModel):
    id: str
    title: str


class BillingSubscriptionOut(BaseModel):
    """The account's prepaid balance presented as OpenAI's subscription limit.

    `hard_limit_usd` is the balance plus the usage settled since the start of the current UTC
    month, so that `hard_limit_usd` minus the month's `total_usage` (as a client computes it)
    is the balance. Amounts are USD as JSON numbers.
    """

    object: Literal["billing_subscription"] = "billing_subscription"
    has_payment_method: bool = Field(
        description="True when a card is saved for the account (for auto-recharge)."
    )
    soft_limit_usd: float = Field(description="Same as hard_limit_usd (no separate alert limit).")
    hard_limit_usd: float = Field(description="Balance + usage since the 1st of the UTC month.")
    system_hard_limit_usd: float = Field(description="Same as hard_limit_usd.")
    access_until: int = Field(description="When the key expires (Unix seconds); 0: never.")
    plan: BillingPlan
    account_name: str


class BillingLineItem(BaseModel):
    name: str = Field(description="The model.")
    cost: float = Field(description="US cents, as a JSON number.")


class BillingDailyCost(BaseModel):
    timestamp: float = Field(description="Start of the UTC day, Unix seconds.")
    line_items: list[BillingLineItem]


class BillingUsageOut(BaseModel):
    """Settled usage of the key's account over [start_date, end_date), one entry per UTC day."""

    object: Literal["list"] = "list"
    total_usage: float = Field(description="US cents, as a JSON number (clients divide by 100).")
    daily_costs: list[BillingDailyCost]


# Stripe and top-ups (billing.payments)


class StripeWebhookOut(BaseModel):
    """A Stripe event received: applied now, or a duplicate of one applied before."""

    received: bool
    id: str
    duplicate: bool


class AutoRechargeIn(BaseModel):
    """An account's auto-recharge: below `threshold_usd`, charge `amount_usd` to a saved card."""

    enabled: bool
    threshold_usd: UsdAmount
    amount_usd: UsdAmount
    daily_cap_usd: UsdAmount | None = None
    payment_method_id: str | None = Field(None, max_length=100)


class AutoRechargeOut(BaseModel):
    """Auto-recharge settings and its back-off state."""

    account_id: str
    enabled: bool
    threshold_usd: str
    amount_usd: str
    daily_cap_usd: str
    payment_method_id: str | None
    consecutive_failures: int
    retry_after: dt.datetime | None
    last_failure: str | None
