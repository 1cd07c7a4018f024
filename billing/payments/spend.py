"""What an account has spent, by UTC day and model, and the limit chat clients show against it.

The customer's statement, so it lives with payments: it reads settled usage and whether a card
is saved for auto-recharge.

Read from the daily usage rollups (``billing.accounts.rollups``), so it counts settled usage
only: an event reported but not yet settled appears here once settlement has priced it.

Chat clients (NextChat, LobeChat, One API front ends) show "used / total" where used is the
usage since the first of the month and total is ``hard_limit_usd``. A prepaid account has no
limit of its own, so the limit is defined so that total - used is the balance:

    hard limit = balance + settled usage since the start of the current UTC month

Amounts here are exact nano-dollars; turning them into the JSON numbers those clients expect is
the HTTP edge's business.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.accounts.accounts import Account, get_account
from billing.accounts.rollups import UsageRollup, month_start
from billing.core.errors import InvalidRequest
from billing.core.money import Nanos
from billing.payments import auto_recharge

# OpenAI's usage endpoint refused longer ranges; clients ask for at most 100 days.
MAX_RANGE_DAYS = 100


@dataclass(frozen=True)
class DailyCost:
    """The settled cost of one model on one UTC day."""

    day: dt.date
    model: str
    cost_nanos: Nanos


@dataclass(frozen=True)
class Subscription:
    """The account as chat clients see it: a balance presented as a limit."""

    account: Account
    month_usage_nanos: Nanos
    has_payment_method: bool

    @property
    def hard_limit_nanos(self) -> Nanos:
        """Balance plus this month's settled usage: the limit minus the usage is the balance."""
        return self.account.balance_nanos + self.month_usage_nanos


class InvalidDateRange(InvalidRequest):
    """A usage range whose end precedes its start, or that is longer than MAX_RANGE_DAYS."""

    code = "invalid_date_range"


def check_range(start: dt.date, end: dt.date) -> None:
    """Accept the half-open range [start, end); raises InvalidDateRange naming the bad end."""
    if end < start:
        raise InvalidDateRange("end_date must not be before start_date.", param="end_date")
    if (end - start).days > MAX_RANGE_DAYS:
        raise InvalidDateRange(
            f"The range from start_date to end_date is {(end - start).days} days;"
            f" at most {MAX_RANGE_DAYS} are allowed.",
            param="end_date",
        )


def daily_costs(
    session: Session, account_id: str, *, start: dt.date, end: dt.date
) -> list[DailyCost]:
    """Settled cost per UTC day and model in [start, end), by day then model, of an account
    the caller has found (none for an unknown one); raises InvalidDateRange for a reversed or
    too long range.

    ``session`` may be a replica's, which may not have the account yet: so no lookup here.
    """
    check_range(start, end)
    rows = session.execute(
        select(UsageRollup.day, UsageRollup.model_id, func.sum(UsageRollup.cost_nanos))
        .where(
            UsageRollup.account_id == account_id,
            UsageRollup.day >= start,
            UsageRollup.day < end,
        )
        .group_by(UsageRollup.day, UsageRollup.model_id)
        .order_by(UsageRollup.day, UsageRollup.model_id)
    )
    # PostgreSQL sums bigints as numeric: back to exact ints.
    return [DailyCost(day, model, int(cost)) for day, model, cost in rows]


def subscription(session: Session, account_id: str, *, now: dt.datetime) -> Subscription:
    """The account with its settled usage since the start of ``now``'s UTC month, and whether a
    card is saved for it (for auto-recharge). Raises AccountNotFound.
    """
    account = get_account(session, account_id)
    used = session.scalar(
        select(func.coalesce(func.sum(UsageRollup.cost_nanos), 0)).where(
            UsageRollup.account_id == account_id, UsageRollup.day >= month_start(now)
        )
    )
    recharge = auto_recharge.get_auto_recharge(session, account_id)
    return Subscription(
        account=account,
        month_usage_nanos=int(used or 0),
        has_payment_method=recharge is not None and recharge.payment_method_id is not None,
    )
