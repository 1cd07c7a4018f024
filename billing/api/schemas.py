"""Bodies of the HTTP API that several modules share: money types, pagination, the error shape,
the model listing. A body that one module uses lives beside its views; the OpenAPI document is
generated from all of them.

Money crosses the API as decimal strings in USD with fields ending in ``_usd``; a JSON number in a
money field is refused with a 400 that says to send a string. Every request body and header
model is an ``Input``, which refuses text with a NUL character anywhere in it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    model_validator,
)
from pydantic_core import core_schema

from billing.core.db import MAX_ROW_ID
from billing.core.errors import InvalidRequest
from billing.core.money import MAX_AMOUNT_NANOS, MoneyFormatError, format_usd, parse_usd
from billing.http.inputs import refuse_nul


def _refuse_numbers(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError('money is sent as a decimal string such as "10.00", not a JSON number')
    return value


def _nanos(value: str) -> int:
    try:
        nanos = parse_usd(value)
    except MoneyFormatError as exc:
        raise ValueError(str(exc)) from None
    if abs(nanos) > MAX_AMOUNT_NANOS:
        raise ValueError(f"{value!r} is over the limit of {format_usd(MAX_AMOUNT_NANOS)} USD")
    return nanos


def _exact_decimal(value: str) -> str:
    _nanos(value)
    return value


UsdAmount = Annotated[
    int,
    GetPydanticSchema(
        lambda _source, _handler: core_schema.no_info_after_validator_function(
            _nanos, core_schema.str_schema()
        )
    ),
    BeforeValidator(_refuse_numbers),
    Field(description="USD as a decimal string, at most 9 decimal places.", examples=["10.00"]),
]
"""Money in a request body: a decimal string on the wire, nano-dollars (an int) to the view."""
PriceAmount = Annotated[
    str,
    BeforeValidator(_refuse_numbers),
    AfterValidator(_exact_decimal),
    Field(description="USD per million tokens, as a decimal string.", examples=["0.39"]),
]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class Input(BaseModel):
    """What a request sends (a body, its headers): text with a NUL character anywhere in it,
    keys and unknown fields included, is refused with a 400 naming where
    (``billing.http.inputs.TextWithNul``) before any field is validated."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        refuse_nul(data)
        return data


class Body(Input):
    """A request body: unknown fields are refused rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``cursor`` for the next (null at the end)."""

    object: Literal["list"] = "list"
    data: list[T]
    next_cursor: str | None


MAX_CURSOR_LENGTH = 200
"""Longest cursor accepted: ours encode an id or a row number, far shorter."""
Cursor = Annotated[
    str | None,
    Field(max_length=MAX_CURSOR_LENGTH, description="The `next_cursor` of the previous page."),
]


class PageQuery(BaseModel):
    """Pagination parameters of every list."""

    limit: int = Field(20, ge=1, le=100, description="Items per page (1-100).")
    cursor: Cursor = None


class InvalidCursor(InvalidRequest):
    """A cursor this API did not return."""

    code = "invalid_cursor"

    def __init__(self) -> None:
        super().__init__(
            "cursor is not a cursor this API returned: pass a next_cursor unchanged.",
            param="cursor",
        )


# The positions cursors hold: ids (letters, digits, "_" and "-") and row numbers.
_POSITION = re.compile(r"[A-Za-z0-9_-]{1,100}")


def encode_cursor(position: str | int) -> str:
    """An opaque cursor for a list position."""
    return base64.urlsafe_b64encode(str(position).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    """The list position in ``cursor``; raises InvalidCursor if it is not one of ours."""
    if cursor is None:
        return None
    if not cursor.isascii() or len(cursor) > MAX_CURSOR_LENGTH:
        raise InvalidCursor
    try:
        position = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidCursor from None
    if not _POSITION.fullmatch(position):
        raise InvalidCursor
    return position


def decode_int_cursor(cursor: str | None) -> int | None:
    """A numeric list position from ``cursor``; raises InvalidCursor."""
    position = decode_cursor(cursor)
    if position is None:
        return None
    if not position.isdigit() or int(position) > MAX_ROW_ID:
        raise InvalidCursor
    return int(position)


class AccountPath(BaseModel):
    account_id: str


ErrorType = Literal["invalid_request_error", "requests", "card_error", "server_error"]
"""Every ``error.type`` an answer carries (``BillingError.type`` and the renderer's own)."""


class ErrorDetail(BaseModel):
    message: str
    type: ErrorType = Field(
        description="invalid_request_error: the request (or an item of it) cannot be done as"
        " sent; requests: too many, retry later; card_error: the card was declined;"
        " server_error: ours, retry later."
    )
    param: str | None = Field(description="The field, parameter or header at fault, if one is.")
    code: str | None


class ErrorOut(BaseModel):
    """The OpenAI error shape every failure is answered with."""

    error: ErrorDetail


ANY_ROUTE_ERRORS: dict[int | str, Any] = {400: ErrorOut, 413: ErrorOut, 503: ErrorOut}
"""What any route may answer: 400 for a malformed request (bad JSON, NUL in text, a bad
parameter), 413 for a body over MAX_CONTENT_LENGTH, 503 when the database is unavailable."""


# Models and prices (the admin API and the customer API list them alike)


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


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
