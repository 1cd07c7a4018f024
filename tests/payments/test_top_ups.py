"""The top-up amount rule, the one the page and the admin API both show: whole cents, within
the configured limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from billing.core.errors import InvalidRequest
from billing.core.money import parse_usd
from billing.payments.top_ups import check_top_up_amount
from tests.conftest import make_settings


@pytest.mark.parametrize(("amount", "cents"), [("5.00", 500), ("20.50", 2050), ("1000", 100_000)])
def test_an_amount_within_the_limits_is_taken_in_cents(
    tmp_path: Path, amount: str, cents: int
) -> None:
    assert check_top_up_amount(parse_usd(amount), make_settings(tmp_path)) == cents


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("20.505", "The amount must be whole cents, such as 20.50."),
        ("4.99", "The amount must be between $5.00 and $1,000.00."),
        ("1000.01", "The amount must be between $5.00 and $1,000.00."),
        ("1000000.001", "The amount must be whole cents, such as 20.50."),
    ],
)
def test_an_amount_outside_the_rule_is_refused_in_the_pages_words(
    tmp_path: Path, amount: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_top_up_amount(parse_usd(amount), make_settings(tmp_path))
    assert refused.value.message == message
    assert refused.value.param == "amount_usd"
