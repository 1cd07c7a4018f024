"""Key states follow settlement: a balance reaching zero turns every key of the account to 402,
a monthly cap reached turns its key to 429, and credits and raised caps undo them (DESIGN 5)."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts.keys import KeyStateChange
from tests.metering.support import (
    CODE,
    adjust,
    balance,
    flat,
    new_account,
    post,
    seed_cost,
)
from tests.support import key_state, new_key


def state_changes(db: Session, key_id: str) -> list[tuple[str | None, str, str]]:
    db.expire_all()
    found = db.execute(
        select(KeyStateChange.old_state, KeyStateChange.new_state, KeyStateChange.reason)
        .where(KeyStateChange.key_id == key_id)
        .order_by(KeyStateChange.id)
    )
    return [(old, new, reason) for old, new, reason in found]


def test_settlement_to_zero_flips_every_key_of_the_account_to_402_and_a_credit_restores_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    counts = (1_000, 0, 0, 0)  # 1_000 code input tokens: 1_490_000 nano-USD
    assert seed_cost(CODE, counts) == 1_490_000
    account_id = new_account(admin, "0.00149")
    first, second = new_key(admin, account_id), new_key(admin, account_id)
    bystander_account = new_account(admin, "0.00149")
    bystander = new_key(admin, bystander_account)
    for key in (first, second, bystander):
        assert key_state(admin, key["id"]) == ("active", 200)

    post(gateway, flat(first, CODE, counts))
    assert balance(admin, account_id) == 0  # exactly zero is insufficient
    for key in (first, second):
        assert key_state(admin, key["id"]) == ("insufficient_balance", 402)
        old, new, reason = state_changes(db, key["id"])[-1]
        assert (old, new) == ("active", "insufficient_balance")
        assert "usage" in reason
    assert key_state(admin, bystander["id"]) == ("active", 200)

    # Usage keeps being charged past zero (the tokens were spent upstream).
    post(gateway, flat(second, CODE, counts))
    assert balance(admin, account_id) == -1_490_000
    assert key_state(admin, second["id"]) == ("insufficient_balance", 402)

    adjust(admin, account_id, "0.00149")  # back to exactly zero: still 402
    assert key_state(admin, first["id"]) == ("insufficient_balance", 402)
    adjust(admin, account_id, "0.000000001")
    for key in (first, second):
        assert key_state(admin, key["id"]) == ("active", 200)
        old, new, reason = state_changes(db, key["id"])[-1]
        assert (old, new) == ("insufficient_balance", "active")
        assert "credit" in reason


def test_a_monthly_cap_is_429_once_settled_spend_reaches_it(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    counts = (1_000, 0, 0, 0)  # 1_490_000 nano-USD on code
    account_id = new_account(admin, "10")
    capped = new_key(admin, account_id, monthly_cap_usd="0.00298")  # two such events
    uncapped = new_key(admin, account_id)

    post(gateway, flat(capped, CODE, counts))
    assert key_state(admin, capped["id"]) == ("active", 200)  # 1_490_000 < 2_980_000
    post(gateway, flat(uncapped, CODE, counts), flat(uncapped, CODE, counts))
    assert key_state(admin, capped["id"]) == ("active", 200)  # the cap is per key

    post(gateway, flat(capped, CODE, counts))  # spend == cap
    assert key_state(admin, capped["id"]) == ("monthly_quota_exceeded", 429)
    old, new, reason = state_changes(db, capped["id"])[-1]
    assert (old, new) == ("active", "monthly_quota_exceeded")
    assert "usage" in reason
    assert key_state(admin, uncapped["id"]) == ("active", 200)

    # Raising the cap above the spend returns the key to active.
    raised = admin.patch(f"/admin/v1/keys/{capped['id']}", json={"monthly_cap_usd": "0.002980001"})
    assert raised.status_code == 200, raised.get_json()
    assert key_state(admin, capped["id"]) == ("active", 200)


def test_402_wins_over_429_and_a_credit_leaves_the_cap_in_force(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    counts = (1_000, 0, 0, 0)  # 1_490_000 nano-USD on code
    account_id = new_account(admin, "0.001")
    capped = new_key(admin, account_id, monthly_cap_usd="0.001")
    uncapped = new_key(admin, account_id)
    post(gateway, flat(capped, CODE, counts))  # over the cap and below zero at once
    assert balance(admin, account_id) == 1_000_000 - 1_490_000
    assert key_state(admin, capped["id"]) == ("insufficient_balance", 402)
    assert key_state(admin, uncapped["id"]) == ("insufficient_balance", 402)

    adjust(admin, account_id, "5")
    assert key_state(admin, uncapped["id"]) == ("active", 200)
    assert key_state(admin, capped["id"]) == ("monthly_quota_exceeded", 429)
    assert [(old, new) for old, new, _ in state_changes(db, capped["id"])][-2:] == [
        ("active", "insufficient_balance"),
        ("insufficient_balance", "monthly_quota_exceeded"),
    ]
