"""The usage chart and the amounts of the customer page (pure functions)."""

from __future__ import annotations

import datetime as dt

import pytest

from billing.core.money import format_dollars
from billing.payments.spend import DailyCost
from billing.web.chart import axis_top, usage_chart


@pytest.mark.parametrize(
    ("nanos", "shown"),
    [
        (0, "$0.00"),
        (20_000_000_000, "$20.00"),
        (1_738_820, "$0.00173882"),
        (589_000_000, "$0.589"),
        (1, "$0.000000001"),
        (-1_234_500_000_000, "-$1,234.50"),
    ],
)
def test_amounts_are_shown_exactly(nanos: int, shown: str) -> None:
    assert format_dollars(nanos) == shown


@pytest.mark.parametrize(
    ("largest", "top"),
    [(0, 1), (1, 1), (3, 5), (1_738_820, 2_000_000), (590_738_820, 1_000_000_000)],
)
def test_the_axis_ends_on_a_round_amount(largest: int, top: int) -> None:
    assert axis_top(largest) == top


def test_one_series_per_model_and_a_table_of_the_same_figures() -> None:
    first = dt.date(2026, 11, 1)
    costs = [
        DailyCost(first, "b-model", 300),
        DailyCost(first, "a-model", 100),
        DailyCost(first + dt.timedelta(days=2), "a-model", 50),
        DailyCost(first + dt.timedelta(days=2), '<script>"x"</script>', 7),
    ]

    chart = usage_chart(costs, first_day=first, days=30)

    assert chart.table.models == ['<script>"x"</script>', "a-model", "b-model"]
    assert chart.table.rows == [
        (first, [0, 100, 300], 400),
        (first + dt.timedelta(days=2), [7, 50, 0], 57),
    ]
    assert chart.table.total_nanos == 457
    assert chart.svg.count('<g class="series"') == 3
    assert chart.svg.count("<rect") == 4
    assert "<script>" not in chart.svg  # model names are escaped
    assert 'role="img"' in chart.svg and "<title" in chart.svg and "<desc" in chart.svg
