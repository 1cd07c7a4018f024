"""A correctly signed Stripe event that lacks a field its handler reads, or carries one that is
not as Stripe sends it, is a 400 naming the field, and changes nothing (issue #10,
observation 2: ``charge.refunded`` without an id was a KeyError and a 500)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.payments.models import Payment, StripeEvent
from tests.payments.conftest import Deliver, balance, event, succeeded
from tests.support import assert_error


def refunded(payment: Payment, **values: Any) -> dict[str, Any]:
    """``charge.refunded`` for the whole of a credited payment."""
    return event(
        "charge.refunded",
        **{
            "charge_id": f"ch_{payment.id}",
            "payment_intent_id": payment.payment_intent_id,
            "amount": payment.amount_cents,
            "amount_refunded": payment.amount_cents,
            "refunded": True,
            "customer_id": "cus_TESTONLY",
        }
        | values,
    )


def without(body: dict[str, Any], *path: str) -> dict[str, Any]:
    """``body`` with the field at ``path`` removed."""
    parent = body
    for name in path[:-1]:
        parent = parent[name]
    del parent[path[-1]]
    return body


def processed(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(StripeEvent)) or 0


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (lambda body: without(body, "data", "object", "id"), "data.object.id"),
        (lambda body: body["data"]["object"].update(id=7), "data.object.id"),
        (
            lambda body: body["data"]["object"].update(amount_refunded="2000"),
            "data.object.amount_refunded",
        ),
        (
            lambda body: body["data"]["object"].update(amount_refunded=-5),
            "data.object.amount_refunded",
        ),
        (lambda body: body["data"]["object"].update(id="ch_" + "x" * 200), "data.object.id"),
        (
            lambda body: body["data"]["object"].update(payment_intent=["pi_1"]),
            "data.object.payment_intent",
        ),
        (lambda body: without(body, "id"), "id"),
        (
            lambda body: body["data"]["object"]["metadata"].update(note="a\x00b"),
            "data.object.metadata.note",
        ),
    ],
)
def test_a_signed_refund_not_shaped_as_stripe_sends_it_is_a_400_and_debits_nothing(
    deliver: Deliver,
    admin: FlaskClient,
    db: Session,
    top_up: Callable[..., Payment],
    change: Callable[[dict[str, Any]], Any],
    param: str,
) -> None:
    payment = top_up("20.00")
    assert deliver(succeeded(payment)).status_code == 200
    before = processed(db)
    body = refunded(payment)
    change(body)
    assert_error(deliver(body), 400, "invalid_request", param)
    assert balance(admin, payment.account_id) == "20.000000000"
    assert processed(db) == before
    assert deliver(refunded(payment)).status_code == 200  # the real one still applies
    assert balance(admin, payment.account_id) == "0.000000000"


@pytest.mark.parametrize(
    ("name", "values", "drop", "param"),
    [
        ("charge.dispute.created", {"amount": "1000"}, None, "data.object.amount"),
        ("charge.dispute.created", {}, "amount", "data.object.amount"),
        ("payment_intent.succeeded", {}, "id", "data.object.id"),
        ("payment_intent.succeeded", {"amount": 12.5}, None, "data.object.amount"),
        (
            "checkout.session.completed",
            {"account_id": "a" * 41},
            None,
            "data.object.metadata.account_id",
        ),
    ],
)
def test_every_handled_type_checks_what_its_handler_reads(
    deliver: Deliver,
    db: Session,
    name: str,
    values: dict[str, Any],
    drop: str | None,
    param: str,
) -> None:
    fields = {
        "payment_intent_id": "pi_shape",
        "checkout_session_id": "cs_shape",
        "charge_id": "ch_shape",
        "dispute_id": "dp_shape",
        "customer_id": "cus_TESTONLY",
        "account_id": "acct_shape",
        "payment_id": "pay_shape",
        "amount": 1000,
        "amount_refunded": 0,
        "refunded": False,
        "status": "needs_response",
        "reason": "fraudulent",
        "payment_status": "paid",
    }
    body = event(name, **(fields | values))
    if drop is not None:
        del body["data"]["object"][drop]
    before = processed(db)
    assert_error(deliver(body), 400, "invalid_request", param)
    assert processed(db) == before
