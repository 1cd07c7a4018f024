"""Auto-recharge: charge an account's saved card off-session when its balance runs low
(DESIGN 6.5).

Invariant: auto-recharge charges a saved card off-session only when the account's available
balance is below its threshold, never while another of its charges is pending (a unique partial
index), never within the back-off after a decline (``billing.payments.fulfilment.fail``), and
never past the daily cap. Each charge carries an idempotency key, so a run that dies after
asking Stripe repeats the same request, not a new charge.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.accounts.accounts import Account, get_account
from billing.core.errors import InvalidRequest, NotFound
from billing.core.ids import new_id
from billing.core.money import Nanos
from billing.core.settings import Settings
from billing.payments import stripe_api
from billing.payments.customers import ensure_customer
from billing.payments.fulfilment import credit, fail, locked_payment, stripe_id
from billing.payments.models import AutoRecharge, Payment, PaymentStatus, Source
from billing.payments.stripe_api import nanos_to_cents
from billing.payments.top_ups import check_top_up_amount

log = logging.getLogger(__name__)

# A claimed auto-recharge that has no PaymentIntent after this long lost its run; ask again.
LOST_CHARGE_AFTER = dt.timedelta(minutes=2)


class AutoRechargeNotSet(NotFound):
    """The account has no auto-recharge settings."""


def configure_auto_recharge(
    session: Session,
    *,
    account_id: str,
    enabled: bool,
    threshold_nanos: Nanos,
    amount_nanos: Nanos,
    daily_cap_nanos: Nanos | None,
    payment_method_id: str | None,
    settings: Settings,
    now: dt.datetime,
) -> AutoRecharge:
    """Set an account's auto-recharge. Enabling needs a card saved on the account's Stripe
    customer (``payment_method_id``). Raises InvalidRequest naming the field at fault."""
    get_account(session, account_id)
    if threshold_nanos < 0:
        raise InvalidRequest("threshold_usd must not be negative.", param="threshold_usd")
    check_top_up_amount(amount_nanos, settings)
    cap = settings.auto_recharge_daily_cap if daily_cap_nanos is None else daily_cap_nanos
    if cap < amount_nanos:
        raise InvalidRequest("daily_cap_usd must be at least amount_usd.", param="daily_cap_usd")
    nanos_to_cents(cap, param="daily_cap_usd")
    if enabled:
        if not payment_method_id:
            raise InvalidRequest(
                "payment_method_id is required to enable auto-recharge.", param="payment_method_id"
            )
        customer_id = ensure_customer(session, account_id, settings=settings, now=now)
        if stripe_api.payment_method_customer(settings, payment_method_id) != customer_id:
            raise InvalidRequest(
                f"payment_method_id is not a card saved on this account's Stripe customer"
                f" ({customer_id}).",
                param="payment_method_id",
            )
    config = session.get(AutoRecharge, account_id)
    if config is None:
        config = AutoRecharge(account_id=account_id, consecutive_failures=0)
        session.add(config)
    config.enabled = enabled
    config.threshold_nanos = threshold_nanos
    config.amount_nanos = amount_nanos
    config.daily_cap_nanos = cap
    config.payment_method_id = payment_method_id or config.payment_method_id
    if enabled:
        # An operator re-enabling after declines (a new card, say) lifts the back-off.
        config.consecutive_failures = 0
        config.retry_after = None
    config.updated_at = now
    session.flush()
    return config


def get_auto_recharge(session: Session, account_id: str) -> AutoRecharge | None:
    """The account's auto-recharge settings, if any were set (AccountNotFound if no account)."""
    get_account(session, account_id)
    return session.get(AutoRecharge, account_id)


def _charged_today(session: Session, account_id: str, now: dt.datetime) -> int:
    midnight = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    total = session.scalar(
        select(func.coalesce(func.sum(Payment.amount_cents), 0)).where(
            Payment.account_id == account_id,
            Payment.source == Source.AUTO_RECHARGE,
            Payment.status.in_([PaymentStatus.PENDING, PaymentStatus.SUCCEEDED]),
            Payment.created_at >= midnight,
        )
    )
    return int(total or 0)


def claim_auto_recharges(session: Session, *, now: dt.datetime) -> list[str]:
    """Open a pending auto-recharge payment for every account that needs one and may have one;
    returns their payment ids (to charge after this transaction commits).

    An account needs one when its available balance is below its threshold; it may have one
    when none of its charges is pending, its back-off has passed and the charge fits its daily
    cap. Pending charges whose run died before reaching Stripe are returned again.
    """
    due = session.scalars(
        select(AutoRecharge)
        .join(Account, Account.id == AutoRecharge.account_id)
        .where(
            AutoRecharge.enabled.is_(True),
            AutoRecharge.payment_method_id.is_not(None),
            Account.available_nanos < AutoRecharge.threshold_nanos,
        )
        .order_by(AutoRecharge.account_id)
        .with_for_update(of=AutoRecharge, skip_locked=True)
    ).all()
    claimed = []
    for config in due:
        if config.retry_after is not None and config.retry_after > now:
            continue
        cents = nanos_to_cents(config.amount_nanos)
        if _charged_today(session, config.account_id, now) + cents > nanos_to_cents(
            config.daily_cap_nanos
        ):
            log.info("auto-recharge of %s skipped: daily cap reached", config.account_id)
            continue
        payment = Payment(
            id=new_id("pay"),
            account_id=config.account_id,
            source=Source.AUTO_RECHARGE,
            mode="payment_intent",
            status=PaymentStatus.PENDING,
            amount_cents=cents,
            refunded_cents=0,
            created_at=now,
            updated_at=now,
        )
        payment.idempotency_key = f"auto-recharge-{payment.id}"
        try:
            with session.begin_nested():
                session.add(payment)
        except IntegrityError:
            continue  # one is pending already (the unique partial index)
        claimed.append(payment.id)
    lost = session.scalars(
        select(Payment.id).where(
            Payment.source == Source.AUTO_RECHARGE,
            Payment.status == PaymentStatus.PENDING,
            Payment.payment_intent_id.is_(None),
            Payment.created_at < now - LOST_CHARGE_AFTER,
        )
    ).all()
    return claimed + [payment_id for payment_id in lost if payment_id not in claimed]


def charge_auto_recharge(
    transaction: Callable[[], AbstractContextManager[Session]],
    payment_id: str,
    *,
    settings: Settings,
    now: dt.datetime,
) -> str:
    """Charge a claimed auto-recharge off-session and record the outcome in a transaction of
    its own; returns the payment's status. No transaction stays open across the Stripe call."""
    with transaction() as session:
        payment = session.get(Payment, payment_id)
        config = session.get(AutoRecharge, payment.account_id) if payment else None
        if payment is None or config is None or payment.status != PaymentStatus.PENDING:
            return payment.status if payment is not None else "missing"
        if not config.enabled or not config.payment_method_id:
            # Turned off between the claim and the charge: release the claim, charge nothing.
            payment.status = PaymentStatus.FAILED
            payment.failure_message = "auto-recharge was disabled"
            payment.updated_at = now
            return payment.status
        customer_id = ensure_customer(session, payment.account_id, settings=settings, now=now)
        payment_method_id = config.payment_method_id or ""
        cents = payment.amount_cents
        idempotency_key = payment.idempotency_key or f"auto-recharge-{payment.id}"
        metadata = {
            "account_id": payment.account_id,
            "payment_id": payment.id,
            "source": Source.AUTO_RECHARGE,
        }
    outcome = stripe_api.charge_off_session(
        settings,
        customer_id=customer_id,
        payment_method_id=payment_method_id,
        cents=cents,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    with transaction() as session:
        payment = locked_payment(session, Payment.id == payment_id)
        assert payment is not None
        intent = outcome.intent
        if intent is not None and payment.payment_intent_id is None:
            payment.payment_intent_id = intent["id"]
        if outcome.declined is not None:
            fail(session, payment, message=outcome.declined, settings=settings, now=now)
        elif intent is not None and intent.get("status") == "succeeded":
            received = int(intent.get("amount_received") or intent.get("amount") or 0)
            credit(
                session,
                payment,
                cents=received,
                charge_id=stripe_id(intent.get("latest_charge")),
                settings=settings,
                now=now,
            )
        # Otherwise it is processing: payment_intent.succeeded or payment_failed settles it.
        return payment.status


def run_auto_recharge(
    transaction: Callable[[], AbstractContextManager[Session]],
    *,
    settings: Settings,
    clock: Callable[[], dt.datetime],
) -> int:
    """Claim and charge every auto-recharge due (beat runs it every minute); returns the
    number of charges attempted. A charge Stripe could not be reached for stays pending and is
    asked again, with the same idempotency key, on a later run."""
    with transaction() as session:
        claimed = claim_auto_recharges(session, now=clock())
    for payment_id in claimed:
        try:
            charge_auto_recharge(transaction, payment_id, settings=settings, now=clock())
        except stripe_api.StripeUnavailable:
            log.warning("auto-recharge %s: Stripe unavailable; retried on a later run", payment_id)
    return len(claimed)
