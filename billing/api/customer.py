"""The OpenAI-compatible endpoints customers call with their own ``sk-`` key."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from flask_openapi3 import APIBlueprint, Tag

from billing.access.auth import Unauthenticated
from billing.accounts import keys
from billing.api import render, schemas
from billing.catalog import catalog
from billing.core.money import NANOS_PER_CENT
from billing.http.context import (
    authenticated,
    bearer_token,
    now,
    report_session,
    session,
    settings,
)
from billing.payments import spend

customer = APIBlueprint(
    "customer",
    __name__,
    url_prefix="/v1",
    abp_security=[{"customer": []}],
    abp_responses={**schemas.ANY_ROUTE_ERRORS, 401: schemas.ErrorOut, 429: schemas.ErrorOut},
)
TAGS = [Tag(name="Customer (OpenAI-compatible)")]


CUSTOMER = "customer"
"""The kind of credential customers send, as the failed-authentication limit counts it."""


def authenticated_key() -> keys.ApiKey:
    """The caller's key; raises InvalidApiKey if it is unknown, revoked, disabled or expired,
    and TooManyFailedAuthentications while the client address has failed too often."""
    return authenticated(CUSTOMER, _bearer_key)


def _bearer_key() -> keys.ApiKey:
    secret = bearer_token()
    if secret is None:
        raise Unauthenticated(
            "Missing API key: send 'Authorization: Bearer sk-...'.", param="Authorization"
        )
    key = keys.find_key(session(), secret, hmac_key=settings().hmac_key)
    if not key.usable(now()):
        raise keys.InvalidApiKey("Incorrect API key provided.", param="Authorization")
    return key


@customer.get("/models", tags=TAGS, responses={200: schemas.ModelList})
def list_models() -> dict[str, Any]:
    """The priced models, OpenAI-style, each with its price per million tokens."""
    authenticated_key()
    listings = catalog.list_models(session(), now=now(), priced_only=True)
    return {
        "object": "list",
        "data": [render.model(item).model_dump(mode="json") for item in listings],
    }


# OpenAI-compatible billing: the shapes chat clients read. Amounts are JSON numbers because those
# clients do arithmetic on them; each is computed from exact nano-dollars and rounded once, here.


def _usd_number(nanos: int) -> float:
    """Nano-dollars as USD, the nearest JSON number to the exact amount."""
    return float(Decimal(nanos).scaleb(-9))


def _cents_number(nanos: int) -> float:
    """Nano-dollars as US cents, the nearest JSON number to the exact amount."""
    return float(Decimal(nanos) / NANOS_PER_CENT)


@customer.get(
    "/dashboard/billing/subscription",
    tags=TAGS,
    responses={200: schemas.BillingSubscriptionOut},
)
def billing_subscription() -> dict[str, Any]:
    """The key's account as OpenAI's subscription: its balance shown as a limit.

    `hard_limit_usd` is the balance plus the usage settled since the 1st of the UTC month, so a
    client's "limit minus this month's usage" is the balance. A key at 402 may still read it.
    """
    key = authenticated_key()
    summary = spend.subscription(session(), key.account_id, now=now())
    limit = _usd_number(summary.hard_limit_nanos)
    return schemas.BillingSubscriptionOut(
        has_payment_method=summary.has_payment_method,
        soft_limit_usd=limit,
        hard_limit_usd=limit,
        system_hard_limit_usd=limit,
        access_until=0 if key.expires_at is None else int(key.expires_at.timestamp()),
        plan=schemas.BillingPlan(id="prepaid", title="Prepaid"),
        account_name=summary.account.name,
    ).model_dump(mode="json")


@customer.get(
    "/dashboard/billing/usage",
    tags=TAGS,
    responses={200: schemas.BillingUsageOut, 400: schemas.ErrorOut, 503: schemas.ErrorOut},
)
def billing_usage(query: schemas.BillingUsageQuery) -> dict[str, Any]:
    """Settled usage of the key's account per UTC day and model, in US cents.

    The range is [start_date, end_date), at most 100 days; every day in it is listed, with one
    line item per model used that day. `total_usage` is the exact total, rounded once. Read from
    the replica when there is one: the last moments' usage may be missing (the subscription's
    balance never lags).
    """
    key = authenticated_key()
    costs = spend.daily_costs(
        report_session(), key.account_id, start=query.start_date, end=query.end_date
    )
    by_day: dict[dt.date, list[schemas.BillingLineItem]] = {}
    for cost in costs:
        by_day.setdefault(cost.day, []).append(
            schemas.BillingLineItem(name=cost.model, cost=_cents_number(cost.cost_nanos))
        )
    days = (query.end_date - query.start_date).days
    return schemas.BillingUsageOut(
        total_usage=_cents_number(sum(cost.cost_nanos for cost in costs)),
        daily_costs=[
            schemas.BillingDailyCost(
                timestamp=dt.datetime.combine(day, dt.time(), dt.UTC).timestamp(),
                line_items=by_day.get(day, []),
            )
            for day in (query.start_date + dt.timedelta(days=n) for n in range(days))
        ],
    ).model_dump(mode="json")
