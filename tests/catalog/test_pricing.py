"""Pricing: exact parts, one half-up rounding, and reasoning billed once as output."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.catalog.pricing import (
    Cost,
    HoldTerms,
    Price,
    breakdown_usd,
    price_usage,
    worst_case_cost,
)
from billing.catalog.usage import MAX_TOKENS, TokenCounts, normalise_usage
from billing.core.money import FEMTOS_PER_NANO, format_usd, parse_usd


def exact_femtos(cost: Cost) -> int:
    """The unrounded cost: the sum of the four exact parts, in femto-dollars."""
    return cost.input_femtos + cost.cached_femtos + cost.output_femtos + cost.reasoning_femtos


# Seed 002's Responses API usage object, verbatim.
SEED_002_USAGE: dict[str, Any] = {
    "input_tokens": 88,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 230,
    "output_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}

# Seed 000's price table, in USD per million tokens.
MINI = Price(input_nanos_per_m=parse_usd("0.14"), output_nanos_per_m=parse_usd("0.69"))
LITE = Price(input_nanos_per_m=parse_usd("0.39"), output_nanos_per_m=parse_usd("1.99"))
CODE = Price(input_nanos_per_m=parse_usd("1.49"), output_nanos_per_m=parse_usd("6.99"))


def test_seed_prices_parse_to_nanos_per_million() -> None:
    nanos = [(p.input_nanos_per_m, p.output_nanos_per_m) for p in (MINI, LITE, CODE)]
    assert nanos == [
        (140_000_000, 690_000_000),
        (390_000_000, 1_990_000_000),
        (1_490_000_000, 6_990_000_000),
    ]


# Seed 002 usage: 88 input (0 cached), 230 output of which 211 reasoning. Reasoning is part of
# the 230 output, so it is priced once, at the output price: 19 plain output + 211 reasoning.
# Amounts below in micro-USD; one micro-USD is 1_000 nanos, or 1_000_000_000 femtos.
#
# mini: input 88 * 0.14 = 12.32; output 19 * 0.69 = 13.11; reasoning 211 * 0.69 = 145.59;
#       total 12.32 + 13.11 + 145.59 = 171.02  (= 88 * 0.14 + 230 * 0.69 = 12.32 + 158.7)
# lite: input 88 * 0.39 = 34.32; output 19 * 1.99 = 37.81; reasoning 211 * 1.99 = 419.89;
#       total 34.32 + 37.81 + 419.89 = 492.02  (= 34.32 + 230 * 1.99 = 34.32 + 457.7)
# code: input 88 * 1.49 = 131.12; output 19 * 6.99 = 132.81; reasoning 211 * 6.99 = 1474.89;
#       total 131.12 + 132.81 + 1474.89 = 1738.82  (= 131.12 + 230 * 6.99 = 131.12 + 1607.7)
# Had reasoning wrongly been added on top of output, mini would be 171.02 + 145.59 = 316.61.
@pytest.mark.parametrize(
    ("price", "parts", "total_nanos", "breakdown"),
    [
        pytest.param(
            MINI,
            (12_320_000_000, 0, 13_110_000_000, 145_590_000_000),
            171_020,
            {
                "input_usd": "0.000012320",
                "cached_usd": "0.000000000",
                "output_usd": "0.000013110",
                "reasoning_usd": "0.000145590",
                "total_usd": "0.000171020",
            },
            id="doubao-seed-2-0-mini",
        ),
        pytest.param(
            LITE,
            (34_320_000_000, 0, 37_810_000_000, 419_890_000_000),
            492_020,
            {
                "input_usd": "0.000034320",
                "cached_usd": "0.000000000",
                "output_usd": "0.000037810",
                "reasoning_usd": "0.000419890",
                "total_usd": "0.000492020",
            },
            id="doubao-seed-2-0-lite",
        ),
        pytest.param(
            CODE,
            (131_120_000_000, 0, 132_810_000_000, 1_474_890_000_000),
            1_738_820,
            {
                "input_usd": "0.000131120",
                "cached_usd": "0.000000000",
                "output_usd": "0.000132810",
                "reasoning_usd": "0.001474890",
                "total_usd": "0.001738820",
            },
            id="doubao-seed-2-0-code",
        ),
    ],
)
def test_seed_002_usage_at_each_seed_price(
    price: Price, parts: tuple[int, int, int, int], total_nanos: int, breakdown: dict[str, str]
) -> None:
    cost = price_usage(normalise_usage(SEED_002_USAGE), price)
    assert (cost.input_femtos, cost.cached_femtos, cost.output_femtos, cost.reasoning_femtos) == (
        parts
    )
    assert cost.total_nanos == total_nanos
    assert exact_femtos(cost) == total_nanos * FEMTOS_PER_NANO
    assert breakdown_usd(cost.parts()) == breakdown


def test_set_cached_and_reasoning_prices_apply_to_their_tokens() -> None:
    # 88 input of which 40 cached; 230 output of which 211 reasoning.
    # uncached 48 * 0.14 = 6.72; cached 40 * 0.014 = 0.56; output 19 * 0.69 = 13.11;
    # reasoning 211 * 1.00 = 211; total 6.72 + 0.56 + 13.11 + 211 = 231.39 micro-USD.
    price = Price(
        input_nanos_per_m=140_000_000,
        output_nanos_per_m=690_000_000,
        cached_input_nanos_per_m=14_000_000,
        reasoning_nanos_per_m=1_000_000_000,
    )
    cost = price_usage(TokenCounts(88, 40, 230, 211), price)
    assert cost == Cost(6_720_000_000, 560_000_000, 13_110_000_000, 211_000_000_000, 231_390)
    assert breakdown_usd(cost.parts()) == {
        "input_usd": "0.000006720",
        "cached_usd": "0.000000560",
        "output_usd": "0.000013110",
        "reasoning_usd": "0.000211000",
        "total_usd": "0.000231390",
    }


def test_unset_cached_and_reasoning_prices_default_to_input_and_output() -> None:
    # uncached 48 * 0.14 = 6.72; cached 40 * 0.14 = 5.6; output 19 * 0.69 = 13.11;
    # reasoning 211 * 0.69 = 145.59; total 171.02 micro-USD, the same as with nothing cached.
    cost = price_usage(TokenCounts(88, 40, 230, 211), MINI)
    assert cost == Cost(6_720_000_000, 5_600_000_000, 13_110_000_000, 145_590_000_000, 171_020)
    assert MINI.cached_input == MINI.input_nanos_per_m
    assert MINI.reasoning == MINI.output_nanos_per_m
    zero = Price(5, 7, cached_input_nanos_per_m=0, reasoning_nanos_per_m=0)
    assert (zero.cached_input, zero.reasoning) == (0, 0)  # 0 is a price, not "unset"
    assert price_usage(TokenCounts(10, 10, 3, 3), zero).total_nanos == 0


@pytest.mark.parametrize(
    ("price", "counts", "total_nanos", "total_usd"),
    [
        # 1 token at 0.0005 nano each = 500_000 femtos = exactly half a nano: rounds up.
        pytest.param(Price(500_000, 0), TokenCounts(1, 0, 0, 0), 1, "0.000000001", id="half"),
        pytest.param(Price(499_999, 0), TokenCounts(1, 0, 0, 0), 0, "0.000000000", id="below"),
        # 2.5 nanos rounds to 3 (half-up), not 2 (half-even).
        pytest.param(Price(2_500_000, 0), TokenCounts(1, 0, 0, 0), 3, "0.000000003", id="2.5"),
        # Two quarter-nano parts: rounded once (0.5 -> 1), not per part (0 + 0).
        pytest.param(Price(250_000, 250_000), TokenCounts(1, 0, 1, 0), 1, "0.000000001", id="once"),
        # The four parts 0.125 nano each sum to half a nano.
        pytest.param(
            Price(125_000, 125_000, 125_000, 125_000),
            TokenCounts(2, 1, 2, 1),
            1,
            "0.000000001",
            id="four-parts",
        ),
    ],
)
def test_total_is_rounded_once_half_up(
    price: Price, counts: TokenCounts, total_nanos: int, total_usd: str
) -> None:
    cost = price_usage(counts, price)
    assert cost.total_nanos == total_nanos
    assert breakdown_usd(cost.parts())["total_usd"] == total_usd


def test_breakdown_parts_are_exact_below_a_nano() -> None:
    cost = price_usage(TokenCounts(1, 0, 3, 1), Price(500_000, 1, reasoning_nanos_per_m=7))
    assert breakdown_usd(cost.parts()) == {
        "input_usd": "0.0000000005",
        "cached_usd": "0.000000000",
        "output_usd": "0.000000000000002",
        "reasoning_usd": "0.000000000000007",
        "total_usd": "0.000000001",
    }


def test_cost_total_must_match_its_parts() -> None:
    assert Cost.from_parts(500_000, 0, 0, 0) == Cost(500_000, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="total_nanos"):
        Cost(500_000, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="negative"):
        Cost.from_parts(-1, 0, 0, 0)
    with pytest.raises(ValueError, match="negative"):
        Cost(-1_000_000, 2_000_000, 0, 0, 1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input_nanos_per_m": -1, "output_nanos_per_m": 0}, ValueError),
        ({"input_nanos_per_m": 0, "output_nanos_per_m": -1}, ValueError),
        (
            {"input_nanos_per_m": 0, "output_nanos_per_m": 0, "cached_input_nanos_per_m": -1},
            ValueError,
        ),
        (
            {"input_nanos_per_m": 0, "output_nanos_per_m": 0, "reasoning_nanos_per_m": -1},
            ValueError,
        ),
        ({"input_nanos_per_m": 0.14, "output_nanos_per_m": 0}, TypeError),
        ({"input_nanos_per_m": 0, "output_nanos_per_m": True}, TypeError),
        (
            {"input_nanos_per_m": 0, "output_nanos_per_m": 0, "reasoning_nanos_per_m": "1"},
            TypeError,
        ),
        ({"input_nanos_per_m": None, "output_nanos_per_m": 0}, TypeError),
    ],
)
def test_price_rejects_bad_values(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Price(**kwargs)


# --- properties --------------------------------------------------------------------------------

# Up to 10_000 USD per million tokens, the catalog's ceiling; odd values exercise rounding.
_price_value = st.integers(0, 10_000 * 1_000_000_000)
_prices = st.builds(
    Price,
    input_nanos_per_m=_price_value,
    output_nanos_per_m=_price_value,
    cached_input_nanos_per_m=st.none() | _price_value,
    reasoning_nanos_per_m=st.none() | _price_value,
)


@st.composite
def _token_counts(draw: st.DrawFn, limit: int = MAX_TOKENS) -> TokenCounts:
    input_tokens = draw(st.integers(0, limit))
    output_tokens = draw(st.integers(0, limit))
    return TokenCounts(
        input_tokens=input_tokens,
        cached_tokens=draw(st.integers(0, input_tokens)),
        output_tokens=output_tokens,
        reasoning_tokens=draw(st.integers(0, output_tokens)),
    )


@given(
    _token_counts(),
    st.integers(0, MAX_TOKENS),
    _price_value,
    _price_value,
    st.none() | _price_value,
)
def test_reasoning_is_never_added_on_top_of_output(
    counts: TokenCounts,
    other_reasoning: int,
    input_price: int,
    output_price: int,
    cached: int | None,
) -> None:
    price = Price(input_price, output_price, cached_input_nanos_per_m=cached)
    moved = TokenCounts(
        counts.input_tokens,
        counts.cached_tokens,
        counts.output_tokens,
        other_reasoning % (counts.output_tokens + 1),
    )
    cost, moved_cost = price_usage(counts, price), price_usage(moved, price)
    assert moved_cost.total_nanos == cost.total_nanos
    assert exact_femtos(moved_cost) == exact_femtos(cost)
    assert cost.output_femtos + cost.reasoning_femtos == counts.output_tokens * output_price


@given(
    _token_counts(limit=MAX_TOKENS // 2),
    st.sampled_from(["uncached", "cached", "output", "reasoning"]),
    st.integers(0, MAX_TOKENS // 2),
    _prices,
)
def test_cost_is_monotone_in_every_count(
    counts: TokenCounts, bucket: str, more: int, price: Price
) -> None:
    i, c, o, r = (
        counts.input_tokens,
        counts.cached_tokens,
        counts.output_tokens,
        counts.reasoning_tokens,
    )
    # Each bucket grows alone; a cached or reasoning token is also an input or output token.
    grown = {
        "uncached": TokenCounts(i + more, c, o, r),
        "cached": TokenCounts(i + more, c + more, o, r),
        "output": TokenCounts(i, c, o + more, r),
        "reasoning": TokenCounts(i, c, o + more, r + more),
    }[bucket]
    before, after = price_usage(counts, price), price_usage(grown, price)
    assert exact_femtos(after) >= exact_femtos(before)
    assert after.total_nanos >= before.total_nanos


@given(_token_counts(), st.integers(0, MAX_TOKENS), _prices, st.booleans())
def test_caching_is_free_to_move_at_equal_prices(
    counts: TokenCounts, other_cached: int, price: Price, explicit: bool
) -> None:
    price = Price(
        price.input_nanos_per_m,
        price.output_nanos_per_m,
        cached_input_nanos_per_m=price.input_nanos_per_m if explicit else None,
        reasoning_nanos_per_m=price.reasoning_nanos_per_m,
    )
    moved = TokenCounts(
        counts.input_tokens,
        other_cached % (counts.input_tokens + 1),
        counts.output_tokens,
        counts.reasoning_tokens,
    )
    cost, moved_cost = price_usage(counts, price), price_usage(moved, price)
    assert moved_cost.total_nanos == cost.total_nanos
    assert exact_femtos(moved_cost) == exact_femtos(cost)
    assert cost.input_femtos + cost.cached_femtos == counts.input_tokens * price.input_nanos_per_m


@given(_token_counts(), _prices)
def test_rounding_error_is_at_most_half_a_nano(counts: TokenCounts, price: Price) -> None:
    cost = price_usage(counts, price)
    exact = (
        (counts.input_tokens - counts.cached_tokens) * price.input_nanos_per_m
        + counts.cached_tokens * price.cached_input
        + (counts.output_tokens - counts.reasoning_tokens) * price.output_nanos_per_m
        + counts.reasoning_tokens * price.reasoning
    )
    assert exact_femtos(cost) == exact
    assert cost.total_nanos >= 0
    assert abs(cost.total_nanos * FEMTOS_PER_NANO - exact) <= FEMTOS_PER_NANO // 2
    assert breakdown_usd(cost.parts())["total_usd"] == format_usd(cost.total_nanos)


# Holds (HoldTerms): the worst case of a request, and the largest grant that fits a balance.


@given(
    _prices,
    st.integers(0, MAX_TOKENS),
    st.integers(1, MAX_TOKENS),
    st.integers(1, MAX_TOKENS),
    st.integers(-(10**6), 10**13),
)
def test_a_grant_is_the_most_output_that_fits(
    price: Price, input_tokens: int, asked: int, minimum: int, available: int
) -> None:
    terms = HoldTerms.of(
        price, input_tokens=input_tokens, output_tokens=asked, min_output_tokens=minimum
    )
    assert terms.min_output_tokens == min(minimum, asked)
    assert terms.full_amount == worst_case_cost(
        price, input_tokens=input_tokens, max_output_tokens=asked
    )
    granted = terms.grant(available)
    if granted is None:
        # Not even the smallest acceptable grant fits.
        assert terms.amount(terms.min_output_tokens) > available
        return
    tokens, amount = granted
    assert terms.min_output_tokens <= tokens <= asked
    assert amount == terms.amount(tokens) <= available
    # The most: one more token would not fit (or all that was asked is granted).
    assert tokens == asked or terms.amount(tokens + 1) > available


def test_a_hold_covers_its_tokens_exactly_rounded_up() -> None:
    # 1000 input and 5125 output tokens of the lite model: 0.00039 + 0.01019875 USD.
    terms = HoldTerms.of(LITE, input_tokens=1000, output_tokens=5125, min_output_tokens=256)
    assert terms.full_amount == parse_usd("0.01058875")
    # A price below a nano-dollar a token: the hold rounds up, never down.
    tiny = HoldTerms.of(Price(1, 3), input_tokens=1, output_tokens=1, min_output_tokens=1)
    assert tiny.full_amount == 1
    assert tiny.most_output(0) is None  # with nothing available, not even the input fits
    assert tiny.grant(1) == (1, 1)
