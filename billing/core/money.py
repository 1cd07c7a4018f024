"""Exact money.

Every amount in this service is an ``int`` count of nano-dollars (1 unit = 1e-9 USD). Binary
floats never touch money: amounts enter as decimal strings, are parsed exactly, and leave as
decimal strings with nine places (``"0.000171020"``).

Prices are exact decimals in USD per million tokens, held at the same fixed scale: an ``int``
count of nano-dollars per million tokens. The product of a token count and such a price is
therefore an exact integer count of 1e-15 USD ("femto-dollars"); an event's cost is the sum of
its parts in that unit, rounded once, half-up, to nano-dollars (:func:`round_femto`).
"""

from __future__ import annotations

import re
from decimal import Decimal

NANOS_PER_USD = 1_000_000_000
NANOS_PER_CENT = 10_000_000
FEMTOS_PER_NANO = 1_000_000
SCALE = 9

Nanos = int

# No amount or balance may pass $1,000,000,000: far beyond any real account, and far below where
# 64-bit nano-dollars overflow, so even concurrent credits at the bound cannot overflow.
MAX_AMOUNT_NANOS = 10**18

# ASCII digits only: Decimal() alone would also take "1_000", "1e3" and non-ASCII digits.
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)


class MoneyFormatError(ValueError):
    """A money string is not an exact decimal at nine places or fewer."""


def parse_usd(text: str) -> Nanos:
    """Parse a decimal USD string (``"10"``, ``"-0.5"``, ``"0.000171030"``) into nano-dollars.

    Raises MoneyFormatError for anything that is not a plain finite decimal, or that has more
    than nine decimal places (which would need rounding: the caller must decide, not us).
    """
    if not isinstance(text, str):
        raise MoneyFormatError('must be a decimal string, such as "10.00"')
    if not _DECIMAL.fullmatch(text):
        raise MoneyFormatError(f'{text!r} is not a plain decimal number such as "10.00"')
    value = Decimal(text)
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -SCALE:
        raise MoneyFormatError(f"{text!r} has more than {SCALE} decimal places")
    return int(value.scaleb(SCALE))


def whole_cents(nanos: Nanos) -> bool:
    """Whether an amount is a whole number of cents, the smallest amount a card can be charged."""
    return nanos % NANOS_PER_CENT == 0


def format_usd(nanos: Nanos) -> str:
    """Render nano-dollars as a USD decimal string with exactly nine places."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def format_dollars(nanos: Nanos) -> str:
    """Exact USD for people: ``$20.00``, ``$0.00173882``, ``-$1,234.50`` (no digit is dropped)."""
    whole, frac = format_usd(abs(nanos)).split(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"{'-' if nanos < 0 else ''}${int(whole):,}.{frac}"


def format_femto_usd(femtos: int) -> str:
    """Render an exact femto-dollar amount (a priced component) as a USD decimal string."""
    sign = "-" if femtos < 0 else ""
    whole, frac = divmod(abs(femtos), NANOS_PER_USD * FEMTOS_PER_NANO)
    digits = f"{frac:015d}".rstrip("0")
    return f"{sign}{whole}.{digits.ljust(SCALE, '0')}"


def round_femto(femtos: int) -> Nanos:
    """Round a non-negative femto-dollar amount to nano-dollars, half-up. The one rounding rule."""
    if femtos < 0:
        raise ValueError("costs are never negative")
    return (femtos + FEMTOS_PER_NANO // 2) // FEMTOS_PER_NANO
