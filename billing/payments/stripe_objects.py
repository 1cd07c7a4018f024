"""What the event handlers read of each Stripe object, checked before an event is applied.

A signed event is Stripe's, but its body is still input: an object without its ``id``, an amount
that is not a whole number of cents, or text that will not fit our columns must be refused with
a 400 naming the field, never fail half-way through a handler. Fields the handlers do not read
pass through unchecked.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from billing.core.errors import InvalidRequest
from billing.core.money import MAX_AMOUNT_NANOS, NANOS_PER_CENT
from billing.core.text import find_nul, printable

StripeId = Annotated[str, Field(min_length=1, max_length=100)]
Cents = Annotated[int, Field(strict=True, ge=0, le=MAX_AMOUNT_NANOS // NANOS_PER_CENT)]


def _expanded_id(value: Any) -> Any:
    return value.get("id") if isinstance(value, dict) else value


# An id the current API sends as a string and older ones (and localstripe) expand into an
# object: the id is what is checked (``fulfilment.stripe_id`` reads it the same way).
Expandable = Annotated[StripeId | None, BeforeValidator(_expanded_id)]
Text = Annotated[str, Field(max_length=500)]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class Metadata(_Shape):
    """Our metadata on a PaymentIntent or Checkout Session (``billing.payments.top_ups``)."""

    payment_id: str | None = Field(None, max_length=40)
    account_id: str | None = Field(None, max_length=40)
    source: Text | None = None


class _Object(_Shape):
    id: StripeId


class PaymentError(_Shape):
    message: Text | None = None
    code: Text | None = None


class PaymentIntent(_Object):
    amount: Cents | None = None
    amount_received: Cents | None = None
    currency: Text | None = None
    latest_charge: Expandable = None
    metadata: Metadata | None = None
    last_payment_error: PaymentError | None = None


class CheckoutSession(_Object):
    amount_total: Cents | None = None
    currency: Text | None = None
    payment_status: Text | None = None
    payment_intent: Expandable = None
    metadata: Metadata | None = None


class Charge(_Object):
    amount_refunded: Cents | None = None
    payment_intent: Expandable = None


class Dispute(_Object):
    amount: Cents
    status: str | None = Field(None, max_length=40)
    charge: Expandable = None
    payment_intent: Expandable = None


class Event(_Shape):
    id: str = Field(min_length=1, max_length=255)
    type: str = Field(min_length=1, max_length=100)
    data: dict[str, Any]


def check_event(event: dict[str, Any], shape: type[BaseModel] | None) -> None:
    """Raise InvalidRequest, naming the field, unless ``event`` is an event whose
    ``data.object`` has the ``shape`` its handler reads (any object when ``shape`` is None)."""
    nul = find_nul(event)
    if nul is not None:
        where = printable(nul)
        raise InvalidRequest(f"The Stripe event's {where} contains a NUL character.", param=where)
    try:
        Event.model_validate(event)
        found = event["data"].get("object")
        if not isinstance(found, dict):
            raise InvalidRequest("The Stripe event has no data.object.", param="data.object")
        if shape is not None:
            shape.model_validate(found)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        inside = "data.object." if shape is not None and exc.title == shape.__name__ else ""
        where = inside + ".".join(str(part) for part in error["loc"])
        raise InvalidRequest(
            f"The Stripe event's {where} is not as Stripe sends it: {error['msg']}.", param=where
        ) from None
