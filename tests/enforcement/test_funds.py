"""The admin view and authorize agree on held and available amounts (issue #12, observation 8:
right after a 402 the account showed one open hold while five events were unsettled).

The cause: the view read the balance from PostgreSQL and then the holds placed through Redis,
while a settlement commits its balance in PostgreSQL and only afterwards releases its holds in
Redis (in the script call that copies the new balance). A settlement landing between the two
reads paired the balance from before it with the holds from after it: holds gone, charges not
yet there. Landing between its own commit and its Redis copy, the other way round: charges and
their holds counted both. ``Runtime.funds`` now reads Redis's holds with its balance version
first, then the row, and again while the row is newer.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal

from flask import Flask
from sqlalchemy.orm import Session

from billing.accounts.accounts import Account
from billing.core import effects
from billing.core.db import transaction, utcnow
from billing.core.money import format_usd
from billing.metering import settlement
from tests.enforcement.conftest import Edge, joined
from tests.enforcement.support import (
    UNLIMITED,
    account_amounts,
    authorize,
    new_account,
    rid,
    worst_case,
)
from tests.support import new_key

COST = worst_case(100, 200)  # what each of the settled requests used
HOLD = worst_case(0, 1000)  # what each request held


def hold_five_and_report_four(edge: Edge) -> tuple[str, str, list[str]]:
    """An account with five requests held, four of which have reported usage (pending)."""
    account_id = new_account(edge.admin, "1")
    key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
    request_ids = [rid() for _ in range(5)]
    for request_id in request_ids:
        held = authorize(edge, key["key"], request_id=request_id, max_output_tokens=1000)
        assert held.status_code == 200
    events = [
        {
            "request_id": request_id,
            "key_id": key["id"],
            "model": "doubao-seed-2-0-lite",
            "input_tokens": 100,
            "output_tokens": 200,
        }
        for request_id in request_ids[:4]
    ]
    assert edge.gateway.post("/gateway/v1/usage", json={"events": events}).status_code == 202
    return account_id, key["key"], request_ids


def test_a_settlement_read_between_the_balance_and_the_holds_is_not_half_counted(
    redis_app: Flask, db: Session
) -> None:
    with joined(redis_app, db, "redis") as edge:
        account_id, _, _ = hold_five_and_report_four(edge)
        # The view has read the account row: five requests held, none charged...
        seen = db.get_one(Account, account_id)
        assert seen.balance_nanos == 1_000_000_000
        # ... when a settlement commits and releases four holds in Redis.
        edge.runtime.settle_pending()
        funds = edge.runtime.funds(seen)
        assert (format_usd(funds.balance_nanos), format_usd(funds.held_nanos)) == (
            format_usd(int((1 - 4 * COST) * 10**9)),
            format_usd(int(HOLD * 10**9)),
        )


def test_a_settlement_not_yet_copied_to_redis_is_waited_for(redis_app: Flask, db: Session) -> None:
    with joined(redis_app, db, "redis") as edge:
        account_id, key, _ = hold_five_and_report_four(edge)
        runtime = edge.runtime
        assert runtime.hotpath is not None
        with transaction(runtime.sessions) as session:
            settled = settlement.settle_batch(
                session, low_balance_nanos=runtime.settings.balance_low_threshold, now=utcnow()
            )
        assert settled.settled == 4
        # Committed in PostgreSQL; the copy to Redis (new balance, four holds released) comes
        # a moment later, as after a commit it does.
        marks = effects.take(session)
        copy = threading.Timer(
            0.1, runtime.hotpath.publish, args=(marks.accounts, marks.settled_requests)
        )
        copy.start()
        try:
            balance, held, available = account_amounts(edge, account_id)
        finally:
            copy.join()
        assert (balance, held, available) == (1 - 4 * COST, HOLD, 1 - 4 * COST - HOLD)
        # Authorize, on Redis, sees the same: what it has available after one more hold.
        after = authorize(edge, key, max_output_tokens=1000).get_json()
        assert Decimal(after["available_usd"]) == available - HOLD


def test_the_view_and_authorize_agree_after_a_402(redis_app: Flask, db: Session) -> None:
    with joined(redis_app, db, "redis") as edge:
        account_id = new_account(edge.admin, "0.01")
        key = new_key(edge.admin, account_id, rate_limit=UNLIMITED)
        for _ in range(4):
            assert (
                authorize(edge, key["key"], max_output_tokens=1000, clip=False).status_code == 200
            )
        refused = authorize(edge, key["key"], max_output_tokens=2000, clip=False)
        assert refused.status_code == 402
        started = time.monotonic()
        balance, held, available = account_amounts(edge, account_id)
        assert time.monotonic() - started < 0.5  # nothing to wait for: the copies agree
        assert (balance, held) == (Decimal("0.01"), 4 * HOLD)
        assert available == Decimal("0.01") - 4 * HOLD
        assert (
            f"at most {int(available * 10**6 / Decimal('1.99'))} output"
            in (refused.get_json()["error"]["message"])
        )
