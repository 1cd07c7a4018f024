"""The key states of DESIGN section 5 and their precedence: one ordered table.

Each row names a state, how the gateway answers it, and the fact that calls for it; the first
row that applies wins. One row is not a key state but a refusal of one request that leaves the
key's state alone (``RequestRefusal``: the request's hold does not fit what is available); it
sits in the table because its precedence is the table's. ``billing.accounts.keys.derive_state``
walks the key-state rows to set a key's stored state, ``billing.enforcement.postgres`` walks
every row (with the stored state and the request's hold) to answer authorize on PostgreSQL,
and the Redis script
(``billing/enforcement/lua/authorize.lua``) checks the same facts in the same order, proved
against this table row by row and pair by pair in ``tests/enforcement/test_state_table.py``.
Pure: no database, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class KeyState(enum.StrEnum):
    """What the gateway must do with a key; ``STATE_TABLE`` gives their precedence."""

    REVOKED = "revoked"
    DISABLED = "disabled"
    EXPIRED = "expired"
    SUSPENDED = "suspended"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    MONTHLY_QUOTA_EXCEEDED = "monthly_quota_exceeded"
    ACTIVE = "active"


class RequestRefusal(enum.StrEnum):
    """A row of the table that refuses one request and leaves the key's state as it is."""

    HOLD_EXCEEDS_AVAILABLE = "hold_exceeds_available"


Row = KeyState | RequestRefusal


@dataclass(frozen=True)
class Enforcement:
    """How a state is answered: the HTTP status and the OpenAI-shaped error."""

    http_status: int
    code: str | None
    type: str | None
    message: str | None
    param: str | None = None


@dataclass(frozen=True)
class KeyFacts:
    """What the state table is read against: a key's facts at one moment, in nano-dollars.

    ``hold_nanos`` is the cost about to be held (clipped to what is available, if the request
    allows it), ``min_hold_nanos`` the smallest hold the request accepts, ``available_nanos``
    the account's balance less its open holds and ``key_held_nanos`` the key's open holds (see
    ``key_facts``).
    """

    revoked: bool
    disabled: bool
    expired: bool
    suspended: bool
    balance_nanos: int
    month_spend: int
    monthly_cap_nanos: int | None
    available_nanos: int
    key_held_nanos: int
    hold_nanos: int
    min_hold_nanos: int


def _balance_spent(facts: KeyFacts) -> bool:
    return facts.balance_nanos <= 0 or facts.available_nanos <= 0


def _hold_too_large(facts: KeyFacts) -> bool:
    return facts.available_nanos < facts.min_hold_nanos


def _cap_passed(facts: KeyFacts) -> bool:
    cap = facts.monthly_cap_nanos
    return cap is not None and facts.month_spend + facts.key_held_nanos + facts.hold_nanos > cap


@dataclass(frozen=True)
class StateRow:
    """One row of the state table: the state, how it is answered, and the fact that calls for
    it."""

    state: Row
    enforcement: Enforcement
    applies: Callable[[KeyFacts], bool]


_INVALID = Enforcement(
    401, "invalid_api_key", "invalid_request_error", "Incorrect API key provided."
)
# DESIGN section 5, in its order: when several rows apply, the first one wins.
STATE_TABLE: tuple[StateRow, ...] = (
    StateRow(KeyState.REVOKED, _INVALID, lambda facts: facts.revoked),
    StateRow(KeyState.DISABLED, _INVALID, lambda facts: facts.disabled),
    StateRow(KeyState.EXPIRED, _INVALID, lambda facts: facts.expired),
    StateRow(
        KeyState.SUSPENDED,
        Enforcement(
            451,
            "content_policy_violation",
            "invalid_request_error",
            "This key is suspended after repeated content policy violations.",
        ),
        lambda facts: facts.suspended,
    ),
    StateRow(
        KeyState.INSUFFICIENT_BALANCE,
        Enforcement(
            402,
            "insufficient_balance",
            "insufficient_quota",
            "Your balance is insufficient. Please top up your account.",
        ),
        _balance_spent,
    ),
    StateRow(
        RequestRefusal.HOLD_EXCEEDS_AVAILABLE,
        Enforcement(
            402,
            "hold_exceeds_available",
            "insufficient_quota",
            "This request's hold does not fit the available balance: at most {tokens} output"
            " tokens can be afforded; lower max_output_tokens or top up.",
            "max_output_tokens",
        ),
        _hold_too_large,
    ),
    StateRow(
        KeyState.MONTHLY_QUOTA_EXCEEDED,
        Enforcement(
            429,
            "monthly_quota_exceeded",
            "insufficient_quota",
            "This key has used its monthly spend cap.",
        ),
        _cap_passed,
    ),
    StateRow(KeyState.ACTIVE, Enforcement(200, None, None, None), lambda facts: True),
)
ENFORCEMENT: dict[Row, Enforcement] = {row.state: row.enforcement for row in STATE_TABLE}
KEY_STATE_ROWS = tuple(row for row in STATE_TABLE if isinstance(row.state, KeyState))
assert [row.state for row in KEY_STATE_ROWS] == list(KeyState), "one row a state, in order"
# The rows about the key itself rather than its money: checked before the request id's earlier
# hold (a repeated request id is answered with its hold whatever the balance is now).
STANDING = frozenset({KeyState.REVOKED, KeyState.DISABLED, KeyState.EXPIRED, KeyState.SUSPENDED})

# A key's stored state follows settled money only, holds coming and going by the second: it
# says whether the smallest request, one nano-dollar, could be held with no other hold open.
# So a balance of zero or less is 402, and a month's spend that has reached the cap is 429;
# the per-request row never applies to these facts (a positive balance fits one nano-dollar).
SMALLEST_HOLD = 1


def first_row(
    facts: KeyFacts, *, stored: KeyState | None = None, rows: tuple[StateRow, ...] = STATE_TABLE
) -> StateRow:
    """The first of ``rows`` that ``facts`` call for or that is the ``stored`` state (which
    stands until the key is derived again)."""
    return next(row for row in rows if row.state is stored or row.applies(facts))
