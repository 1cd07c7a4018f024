"""Pricing: the cost of one event's tokens, exact to the femto-dollar and rounded once.

A price is an ``int`` of nano-dollars per million tokens, so a token count times a price is an
exact ``int`` of femto-dollars (1e-15 USD). Each of the four disjoint token buckets is priced
exactly; only their sum is rounded, once, half-up, to nano-dollars (:func:`money.round_femto`).
Output counts already include reasoning, so reasoning tokens are priced instead of, never on top
of, their share of output.
"""

from __future__ import annotations

from dataclasses import dataclass

from billing.catalog.usage import TokenCounts
from billing.core.money import FEMTOS_PER_NANO, Nanos, format_femto_usd, format_usd, round_femto


@dataclass(frozen=True, slots=True)
class Price:
    """Prices in nano-dollars per million tokens (see billing.core.money)."""

    input_nanos_per_m: int
    output_nanos_per_m: int
    cached_input_nanos_per_m: int | None = None
    """None: cached input costs the same as input."""
    reasoning_nanos_per_m: int | None = None
    """None: reasoning costs the same as output."""

    def __post_init__(self) -> None:
        for name in (
            "input_nanos_per_m",
            "output_nanos_per_m",
            "cached_input_nanos_per_m",
            "reasoning_nanos_per_m",
        ):
            value = getattr(self, name)
            if value is None and name in ("cached_input_nanos_per_m", "reasoning_nanos_per_m"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Price.{name} must be an int of nano-dollars, got {value!r}")
            if value < 0:
                raise ValueError(f"Price.{name} must not be negative, got {value}")

    @property
    def cached_input(self) -> int:
        """The cached-input price in effect: the cached price if set, else the input price."""
        if self.cached_input_nanos_per_m is None:
            return self.input_nanos_per_m
        return self.cached_input_nanos_per_m

    @property
    def reasoning(self) -> int:
        """The reasoning price in effect: the reasoning price if set, else the output price."""
        if self.reasoning_nanos_per_m is None:
            return self.output_nanos_per_m
        return self.reasoning_nanos_per_m


@dataclass(frozen=True, slots=True)
class Cost:
    """One event's exact priced parts in femto-dollars and the charged total in nano-dollars."""

    input_femtos: int
    cached_femtos: int
    output_femtos: int
    reasoning_femtos: int
    total_nanos: Nanos

    def __post_init__(self) -> None:
        parts = (self.input_femtos, self.cached_femtos, self.output_femtos, self.reasoning_femtos)
        if min(parts) < 0:
            raise ValueError(f"cost parts are never negative, got {parts}")
        # A total that disagrees with its parts would make the stored breakdown a lie.
        if self.total_nanos != round_femto(sum(parts)):
            raise ValueError(
                f"total_nanos {self.total_nanos} is not the half-up rounding of the parts "
                f"({sum(parts)} femto-dollars)"
            )

    @classmethod
    def from_parts(
        cls, input_femtos: int, cached_femtos: int, output_femtos: int, reasoning_femtos: int
    ) -> Cost:
        """A Cost whose total is the parts' sum rounded half-up; ValueError if a part is < 0."""
        total = round_femto(input_femtos + cached_femtos + output_femtos + reasoning_femtos)
        return cls(input_femtos, cached_femtos, output_femtos, reasoning_femtos, total)

    def parts(self) -> dict[str, int]:
        """The exact parts in femto-dollars (1e-15 USD) and the total in nano-dollars."""
        return {
            "input_femtos": self.input_femtos,
            "cached_femtos": self.cached_femtos,
            "output_femtos": self.output_femtos,
            "reasoning_femtos": self.reasoning_femtos,
            "total_nanos": self.total_nanos,
        }


def breakdown_usd(parts: dict[str, int]) -> dict[str, str]:
    """Stored parts (see :meth:`Cost.parts`) as exact USD strings, for people to read."""
    return {
        "input_usd": format_femto_usd(parts["input_femtos"]),
        "cached_usd": format_femto_usd(parts["cached_femtos"]),
        "output_usd": format_femto_usd(parts["output_femtos"]),
        "reasoning_usd": format_femto_usd(parts["reasoning_femtos"]),
        "total_usd": format_usd(parts["total_nanos"]),
    }


def price_usage(counts: TokenCounts, price: Price) -> Cost:
    """Price one event's tokens exactly, rounding the total once half-up; raises nothing."""
    return Cost.from_parts(
        input_femtos=(counts.input_tokens - counts.cached_tokens) * price.input_nanos_per_m,
        cached_femtos=counts.cached_tokens * price.cached_input,
        output_femtos=(counts.output_tokens - counts.reasoning_tokens) * price.output_nanos_per_m,
        reasoning_femtos=counts.reasoning_tokens * price.reasoning,
    )


def worst_case_cost(price: Price, *, input_tokens: int, max_output_tokens: int) -> Nanos:
    """The most a request can cost: its input at the input price and every possible output
    token at the dearer of the output and reasoning prices, rounded up to a nano-dollar (a
    hold never falls short of the charge for these counts by rounding)."""
    terms = HoldTerms.of(
        price,
        input_tokens=input_tokens,
        output_tokens=max_output_tokens,
        min_output_tokens=max_output_tokens,
    )
    return terms.full_amount


@dataclass(frozen=True, slots=True)
class HoldTerms:
    """What a request's hold is made of: its input at the input price, fixed, and each output
    token at the dearer of the output and reasoning prices, in femto-dollars; the output tokens
    asked for, and the fewest a clipped hold may grant (``output_tokens`` when the request asks
    for all or nothing).

    ``amount(n)`` is the hold covering ``n`` output tokens, rounded up to a nano-dollar, so a
    hold never falls short of the charge for the counts it covers. Holds are monotone in ``n``,
    so the largest grant that fits an available balance is well defined (``grant``).
    """

    input_femtos: int
    output_femtos_per_token: int
    output_tokens: int
    min_output_tokens: int

    @classmethod
    def of(
        cls, price: Price, *, input_tokens: int, output_tokens: int, min_output_tokens: int
    ) -> HoldTerms:
        """The terms of a request to a model at ``price``; ``min_output_tokens`` is capped at
        ``output_tokens`` (a request below the minimum is never clipped)."""
        return cls(
            input_tokens * price.input_nanos_per_m,
            max(price.output_nanos_per_m, price.reasoning),
            output_tokens,
            min(min_output_tokens, output_tokens),
        )

    def amount(self, output_tokens: int) -> Nanos:
        """The hold covering the input and ``output_tokens``, rounded up to a nano-dollar."""
        femtos = self.input_femtos + output_tokens * self.output_femtos_per_token
        return -(-femtos // FEMTOS_PER_NANO)

    @property
    def full_amount(self) -> Nanos:
        """The hold covering every output token asked for."""
        return self.amount(self.output_tokens)

    def most_output(self, available: Nanos) -> int | None:
        """The most output tokens, at most those asked for, whose hold fits ``available``; None
        when not even the input fits."""
        room = available * FEMTOS_PER_NANO - self.input_femtos
        if room < 0:
            return None
        if self.output_femtos_per_token == 0:
            return self.output_tokens
        return min(self.output_tokens, room // self.output_femtos_per_token)

    def grant(self, available: Nanos) -> tuple[int, Nanos] | None:
        """The output tokens granted against ``available`` and their hold: all asked for if
        they fit, else the most that fit if that is at least the minimum, else None."""
        most = self.most_output(available)
        if most is None or most < self.min_output_tokens:
            return None
        return most, self.amount(most)
