"""Auto-recharge (``/admin/v1/accounts/<account_id>/auto-recharge``): top an account up from its
saved card when its available balance runs low (``billing.payments.auto_recharge``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask_openapi3 import Tag
from pydantic import BaseModel, Field

from billing.api import schemas
from billing.api.admin.blueprint import admin
from billing.core.money import format_usd
from billing.http.context import now, session, settings
from billing.payments import auto_recharge
from billing.payments.models import AutoRecharge

TAGS = [Tag(name="Auto-recharge")]


class AutoRechargeIn(schemas.Body):
    """An account's auto-recharge: below `threshold_usd`, charge `amount_usd` to a saved card."""

    enabled: bool
    threshold_nanos: schemas.UsdAmount = Field(alias="threshold_usd")
    amount_nanos: schemas.UsdAmount = Field(alias="amount_usd")
    daily_cap_nanos: schemas.UsdAmount | None = Field(None, alias="daily_cap_usd")
    payment_method_id: str | None = Field(None, max_length=100)


class AutoRechargeOut(BaseModel):
    """Auto-recharge settings and its back-off state."""

    account_id: str
    enabled: bool
    threshold_usd: str
    amount_usd: str
    daily_cap_usd: str
    payment_method_id: str | None
    consecutive_failures: int
    retry_after: dt.datetime | None
    last_failure: str | None


def _auto_recharge(row: AutoRecharge) -> dict[str, Any]:
    return AutoRechargeOut(
        account_id=row.account_id,
        enabled=row.enabled,
        threshold_usd=format_usd(row.threshold_nanos),
        amount_usd=format_usd(row.amount_nanos),
        daily_cap_usd=format_usd(row.daily_cap_nanos),
        payment_method_id=row.payment_method_id,
        consecutive_failures=row.consecutive_failures,
        retry_after=row.retry_after,
        last_failure=row.last_failure,
    ).model_dump(mode="json")


@admin.put(
    "/accounts/<account_id>/auto-recharge",
    tags=TAGS,
    responses={200: AutoRechargeOut, 502: schemas.ErrorOut},
)
def set_auto_recharge(path: schemas.AccountPath, body: AutoRechargeIn) -> dict[str, Any]:
    """Set the account's auto-recharge: when its available balance falls below `threshold_usd`,
    charge `amount_usd` to the saved card `payment_method_id`, at most `daily_cap_usd` a day."""
    row = auto_recharge.configure_auto_recharge(
        session(),
        account_id=path.account_id,
        enabled=body.enabled,
        threshold_nanos=body.threshold_nanos,
        amount_nanos=body.amount_nanos,
        daily_cap_nanos=body.daily_cap_nanos,
        payment_method_id=body.payment_method_id,
        settings=settings(),
        now=now(),
    )
    return _auto_recharge(row)


@admin.get(
    "/accounts/<account_id>/auto-recharge",
    tags=TAGS,
    responses={200: AutoRechargeOut},
)
def get_auto_recharge(path: schemas.AccountPath) -> dict[str, Any]:
    """The account's auto-recharge settings; 404 if none were set."""
    row = auto_recharge.get_auto_recharge(session(), path.account_id)
    if row is None:
        raise auto_recharge.AutoRechargeNotSet(
            f"Account {path.account_id} has no auto-recharge.", param="account_id"
        )
    return _auto_recharge(row)
