"""Money in request bodies: parsed to nano-dollars once, at the edge, or refused naming why."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from billing.api.schemas import PriceAmount, UsdAmount
from billing.core.money import MAX_AMOUNT_NANOS


class Money(BaseModel):
    amount: UsdAmount
    price: PriceAmount = "0"


@pytest.mark.parametrize(
    ("text", "nanos"),
    [("10", 10_000_000_000), ("-0.5", -500_000_000), ("0.000000001", 1), ("0", 0)],
)
def test_a_decimal_string_becomes_nano_dollars(text: str, nanos: int) -> None:
    assert Money(amount=text).amount == nanos


@pytest.mark.parametrize("value", [10, 10.5, -1])
def test_a_json_number_is_refused_saying_to_send_a_string(value: Any) -> None:
    with pytest.raises(ValidationError, match="not a JSON number"):
        Money(amount=value)
    with pytest.raises(ValidationError, match="not a JSON number"):
        Money(amount="1", price=value)


@pytest.mark.parametrize("text", ["1e3", "1.0000000001", "ten", "", " 1"])
def test_a_string_that_is_not_an_exact_decimal_is_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        Money(amount=text)


def test_the_limit_is_inclusive() -> None:
    limit = str(MAX_AMOUNT_NANOS // 10**9)
    assert Money(amount=limit).amount == MAX_AMOUNT_NANOS
    with pytest.raises(ValidationError, match="over the limit"):
        Money(amount=limit + ".000000001")


def test_prices_stay_the_decimal_string_sent() -> None:
    assert Money(amount="1", price="0.39").price == "0.39"


def test_money_is_documented_as_a_string() -> None:
    properties = Money.model_json_schema()["properties"]
    assert properties["amount"]["type"] == "string"
    assert properties["price"]["type"] == "string"
