"""``POST /stripe/webhook``: signatures, deduplication, exactly-once credit, refunds, disputes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.ledger.ledger import LedgerEntry
from billing.notify.models import WebhookEvent
from billing.payments.models import Payment, StripeEvent
from tests.payments.conftest import Deliver, balance, event, sign, succeeded
from tests.support import assert_error, key_state, new_key


def _entries(db: Session, account_id: str) -> list[tuple[str, int]]:
    rows = db.execute(
        select(LedgerEntry.kind, LedgerEntry.amount_nanos)
        .where(LedgerEntry.account_id == account_id)
        .order_by(LedgerEntry.id)
    )
    return [(kind, amount) for kind, amount in rows]


def _processed(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(StripeEvent)) or 0


@pytest.mark.parametrize(
    "case",
    ["missing", "garbage", "wrong secret", "tampered", "stale", "future"],
)
def test_bad_signatures_answer_400_and_change_nothing(
    case: str,
    client: FlaskClient,
    admin: FlaskClient,
    db: Session,
    top_up: Callable[..., Payment],
) -> None:
    payment = top_up("20.00")
    payload = json.dumps(succeeded(payment))
    now = int(time.time())
    headers = {
        "missing": {},
        "garbage": {"Stripe-Signature": "not a signature"},
        "wrong secret": {"Stripe-Signature": sign(payload, secret="whsec_someone_else")},
        "tampered": {"Stripe-Signature": sign(payload)},
        "stale": {"Stripe-Signature": sign(payload, timestamp=now - 600)},
        "future": {"Stripe-Signature": sign(payload, timestamp=now + 600)},
    }[case]
    if case == "tampered":  # sign the real body, send a richer one
        payload = payload.replace('"amount_received": 2000', '"amount_received": 200000')
        assert "200000" in payload
    processed = _processed(db)
    response = client.post(
        "/stripe/webhook", data=payload, headers=headers, content_type="application/json"
    )
    assert_error(response, 400, "invalid_signature", "Stripe-Signature")
    assert balance(admin, payment.account_id) == "0.000000000"
    assert _entries(db, payment.account_id) == []
    assert _processed(db) == processed
    db.refresh(payment)
    assert payment.status == "pending"


def test_a_signed_body_that_is_not_an_event_is_a_400(deliver: Deliver) -> None:
    assert_error(deliver("[1, 2]"), 400, "invalid_signature")
    assert_error(deliver(json.dumps({"id": 3, "type": None})), 400, "invalid_request")


def test_the_same_event_three_times_and_out_of_order_credits_once(
    deliver: Deliver, admin: FlaskClient, db: Session, top_up: Callable[..., Payment]
) -> None:
    payment = top_up("20.00")
    success = succeeded(payment)
    failure = event(
        "payment_intent.payment_failed",
        payment_intent_id=payment.payment_intent_id,
        amount=payment.amount_cents,
        customer_id="cus_TESTONLY",
        account_id=payment.account_id,
        payment_id=payment.id,
    )
    answers = [deliver(success), deliver(success), deliver(failure), deliver(success)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
    assert [answer.get_json()["duplicate"] for answer in answers] == [False, True, False, True]
    # Stripe resending the same success under a new event id credits nothing more either.
    assert deliver(succeeded(payment)).get_json()["duplicate"] is False
    assert _entries(db, payment.account_id) == [("top_up", 20_000_000_000)]
    assert balance(admin, payment.account_id) == "20.000000000"
    db.refresh(payment)
    assert payment.status == "succeeded" and payment.charge_id == f"ch_{payment.id}"


def test_checkout_events_in_any_order_credit_once(
    deliver: Deliver, admin: FlaskClient, db: Session, top_up: Callable[..., Payment]
) -> None:
    payment = top_up("25.00")
    common = {
        "checkout_session_id": f"cs_test_{payment.id}",
        "payment_intent_id": payment.payment_intent_id,
        "amount": payment.amount_cents,
        "customer_id": "cus_TESTONLY",
        "account_id": payment.account_id,
        "payment_id": payment.id,
    }
    pending = event("checkout.session.completed", payment_status="unpaid", **common)
    async_paid = event("checkout.session.async_payment_succeeded", payment_status="paid", **common)
    assert deliver(pending).status_code == 200
    assert _entries(db, payment.account_id) == []  # the bank debit is still settling
    for body in (async_paid, succeeded(payment), async_paid, pending):
        assert deliver(body).status_code == 200
    assert _entries(db, payment.account_id) == [("top_up", 25_000_000_000)]
    assert balance(admin, payment.account_id) == "25.000000000"


def test_partial_then_full_refund_debits_exactly_the_change(
    deliver: Deliver, admin: FlaskClient, db: Session, top_up: Callable[..., Payment]
) -> None:
    payment = top_up("20.00")
    assert deliver(succeeded(payment)).status_code == 200

    def refunded(cents: int) -> dict[str, Any]:
        return event(
            "charge.refunded",
            charge_id=f"ch_{payment.id}",
            payment_intent_id=payment.payment_intent_id,
            amount=2000,
            amount_refunded=cents,
            refunded=cents == 2000,
            customer_id="cus_TESTONLY",
        )

    partial, full = refunded(550), refunded(2000)
    for body in (partial, partial, full, refunded(550), full):
        assert deliver(body).status_code == 200
    assert _entries(db, payment.account_id) == [
        ("top_up", 20_000_000_000),
        ("refund", -5_500_000_000),
        ("refund", -14_500_000_000),
    ]
    assert balance(admin, payment.account_id) == "0.000000000"


def test_a_refund_before_its_payment_is_credited_is_retried(
    deliver: Deliver, db: Session, top_up: Callable[..., Payment]
) -> None:
    payment = top_up("20.00")
    early = event(
        "charge.refunded",
        charge_id=f"ch_{payment.id}",
        payment_intent_id=payment.payment_intent_id,
        amount=2000,
        amount_refunded=2000,
        refunded=True,
        customer_id="cus_TESTONLY",
    )
    assert_error(deliver(early), 409, "payment_not_credited")
    assert deliver(succeeded(payment)).status_code == 200
    assert deliver(early).get_json()["duplicate"] is False  # Stripe's retry now applies
    assert [amount for _, amount in _entries(db, payment.account_id)] == [
        20_000_000_000,
        -20_000_000_000,
    ]


def test_a_dispute_debits_and_a_won_dispute_recredits(
    deliver: Deliver, admin: FlaskClient, db: Session, top_up: Callable[..., Payment]
) -> None:
    payment = top_up("20.00")
    assert deliver(succeeded(payment)).status_code == 200
    fields = {
        "dispute_id": f"dp_{payment.id}",
        "charge_id": f"ch_{payment.id}",
        "payment_intent_id": payment.payment_intent_id,
        "amount": 2000,
    }
    created = event("charge.dispute.created", status="needs_response", **fields)
    won = event("charge.dispute.closed", status="won", **fields)
    assert deliver(created).status_code == 200
    assert balance(admin, payment.account_id) == "0.000000000"
    for body in (created, won, won, event("charge.dispute.created", status="won", **fields)):
        assert deliver(body).status_code == 200
    assert _entries(db, payment.account_id) == [
        ("top_up", 20_000_000_000),
        ("dispute", -20_000_000_000),
        ("dispute_won", 20_000_000_000),
    ]
    assert balance(admin, payment.account_id) == "20.000000000"


def test_a_lost_dispute_debits_once(
    deliver: Deliver, db: Session, top_up: Callable[..., Payment]
) -> None:
    payment = top_up("20.00")
    assert deliver(succeeded(payment)).status_code == 200
    fields = {
        "dispute_id": f"dp_{payment.id}",
        "charge_id": f"ch_{payment.id}",
        "payment_intent_id": payment.payment_intent_id,
        "amount": 1500,
    }
    # closed (lost) may arrive before created: the money is gone either way, debited once.
    for body in (
        event("charge.dispute.closed", status="lost", **fields),
        event("charge.dispute.created", status="needs_response", **fields),
    ):
        assert deliver(body).status_code == 200
    assert _entries(db, payment.account_id) == [
        ("top_up", 20_000_000_000),
        ("dispute", -15_000_000_000),
    ]


def test_a_credit_lifting_a_402_account_reopens_its_keys_and_tells_the_gateway(
    deliver: Deliver,
    admin: FlaskClient,
    db: Session,
    account: dict[str, Any],
    top_up: Callable[..., Payment],
) -> None:
    hook = admin.post("/admin/v1/webhook-endpoints", json={"url": "https://gw.test/hooks"})
    assert hook.status_code == 201, hook.get_json()
    key = new_key(admin, account["id"])
    assert key_state(admin, key["id"]) == ("insufficient_balance", 402)
    payment = top_up("20.00")

    assert deliver(succeeded(payment)).status_code == 200

    assert key_state(admin, key["id"]) == ("active", 200)
    announced = db.scalars(select(WebhookEvent).order_by(WebhookEvent.id)).all()
    changed = [e.payload for e in announced if e.type == "key.state_changed"]
    assert changed[-1]["key_id"] == key["id"]
    assert (changed[-1]["old_state"], changed[-1]["new_state"]) == (
        "insufficient_balance",
        "active",
    )
    topups = [e.payload for e in announced if e.type == "topup.succeeded"]
    assert len(topups) == 1
    assert topups[0] | {"succeeded_at": None, "ledger_entry_id": None} == {
        "account_id": account["id"],
        "payment_id": payment.id,
        "source": "top_up",
        "amount_usd": "20.000000000",
        "balance_usd": "20.000000000",
        "ledger_entry_id": None,
        "succeeded_at": None,
    }


def test_a_payment_that_is_not_ours_is_acknowledged_and_ignored(
    deliver: Deliver, db: Session
) -> None:
    foreign = event(
        "payment_intent.succeeded",
        payment_intent_id="pi_not_ours",
        amount=999,
        customer_id="cus_other",
        charge_id="ch_not_ours",
        account_id="acct_unknown",
        payment_id="pay_unknown",
    )
    response = deliver(foreign)
    assert response.status_code == 200 and response.get_json()["duplicate"] is False
    assert db.scalar(select(func.count()).select_from(LedgerEntry)) == 0
