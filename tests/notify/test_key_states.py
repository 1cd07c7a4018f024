"""GET /gateway/v1/key-states: the feed of key-state changes for gateways that missed webhooks,
paged by an opaque cursor, never skipping a change that commits late (DESIGN 6.4 and 8)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.accounts import accounts, keys
from billing.api.schemas import decode_cursor
from billing.core.db import utcnow
from billing.core.money import parse_usd
from billing.ledger import ledger
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN
from tests.support import assert_error

FEED = "/gateway/v1/key-states"
NO_LIMITS = keys.KeySettings("k", None, None, None, None)


def read_all(gateway: FlaskClient, *, limit: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Every change the feed hands out, page by page; and the cursors it answered."""
    items: list[dict[str, Any]] = []
    cursors: list[str] = []
    query = f"{FEED}?limit={limit}"
    for _ in range(1000):
        response = gateway.get(query)
        assert response.status_code == 200, response.get_data(as_text=True)
        page = response.get_json()
        assert set(page) == {"object", "data", "next_cursor", "has_more"}
        assert len(page["data"]) <= limit
        items += page["data"]
        cursors.append(page["next_cursor"])
        if not page["has_more"]:
            return items, cursors
        query = f"{FEED}?limit={limit}&cursor={page['next_cursor']}"
    raise AssertionError("the feed never ended")


def history(db: Session, runtime: Runtime, start: dt.datetime) -> tuple[str, str]:
    """A key that is created (402: no money), credited (active) and revoked (401)."""
    minute = dt.timedelta(minutes=1)
    account = accounts.create_account(db, name="feed", email=None, now=start)
    key, _ = keys.issue_key(
        db,
        account_id=account.id,
        settings=NO_LIMITS,
        hmac_key=runtime.settings.hmac_key,
        now=start,
    )
    credit = ledger.Posting(
        account.id, ledger.EntryKind.ADJUSTMENT, parse_usd("5"), "credit", "test"
    )
    ledger.post(
        db, credit, low_balance_nanos=runtime.settings.balance_low_threshold, now=start + minute
    )
    keys.revoke_key(db, key.id, now=start + 2 * minute)
    db.flush()
    return key.id, account.id


def test_changes_are_listed_in_order_with_their_http_status(
    gateway: FlaskClient, db: Session, runtime: Runtime
) -> None:
    start = (utcnow() - dt.timedelta(minutes=10)).replace(microsecond=0)
    key_id, account_id = history(db, runtime, start)
    items, _ = read_all(gateway, limit=100)
    mine = [item for item in items if item["key_id"] == key_id]
    assert [(i["old_state"], i["new_state"], i["http_status"]) for i in mine] == [
        (None, "insufficient_balance", 402),
        ("insufficient_balance", "active", 200),
        ("active", "revoked", 401),
    ]
    assert mine[0] == {
        "object": "key_state_change",
        "id": mine[0]["id"],
        "key_id": key_id,
        "account_id": account_id,
        "old_state": None,
        "new_state": "insufficient_balance",
        "http_status": 402,
        "code": "insufficient_balance",
        "sequence": 1,
        "reason": "created",
        "changed_at": start.isoformat().replace("+00:00", "Z"),
    }
    assert [item["reason"] for item in mine[1:]] == ["adjustment credit", "revoked by an operator"]
    # The sequence of the key's webhooks, so a gateway can merge the feed with them.
    assert [item["sequence"] for item in mine] == [1, 2, 3]
    assert [item["code"] for item in mine] == ["insufficient_balance", None, "invalid_api_key"]
    ids = [item["id"] for item in items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_pages_chain_through_the_cursor_to_the_same_changes(
    gateway: FlaskClient, db: Session, runtime: Runtime
) -> None:
    start = utcnow() - dt.timedelta(minutes=10)
    for _ in range(3):
        history(db, runtime, start)
    whole, _ = read_all(gateway, limit=1000)
    paged, cursors = read_all(gateway, limit=2)
    assert paged == whole
    assert len(whole) >= 9
    assert len(cursors) == len(whole) // 2 + 1

    # Resuming from the last cursor hands out nothing new, and answers the same cursor.
    again = gateway.get(f"{FEED}?cursor={cursors[-1]}").get_json()
    assert again["data"] == []
    assert again["next_cursor"] == cursors[-1]
    assert again["has_more"] is False


def test_a_change_is_held_back_until_it_is_a_minute_old(
    gateway: FlaskClient, db: Session, runtime: Runtime
) -> None:
    old_key, _ = history(db, runtime, utcnow() - dt.timedelta(minutes=10))
    fresh_key, _ = history(db, runtime, utcnow())
    items, cursors = read_all(gateway, limit=100)
    assert {item["key_id"] for item in items} >= {old_key}
    assert fresh_key not in {item["key_id"] for item in items}
    # The cursor stops short of the fresh changes: reading on from it later hands them out.
    later = keys.state_changes(
        db,
        after=int(_decoded(cursors[-1])),
        limit=100,
        now=utcnow() + keys.CHANGE_COMMIT_LAG + dt.timedelta(minutes=3),
    )
    assert [change.key_id for change, _ in later] == [fresh_key] * 3


def test_a_young_change_stops_the_page_even_before_older_ones(
    db: Session, runtime: Runtime
) -> None:
    """Ids are assigned at insert, not commit: an old change can carry a higher id than a young
    one. Handing it out would move the cursor past the young one, so the page stops first."""
    now = utcnow()
    before = keys.state_changes(db, after=None, limit=100_000, now=now + dt.timedelta(days=1))
    after = before[-1][0].id if before else 0
    young_key, _ = history(db, runtime, now)
    old_key, _ = history(db, runtime, now - dt.timedelta(minutes=10))
    assert keys.state_changes(db, after=after, limit=100, now=now) == []
    settled = keys.state_changes(db, after=after, limit=100, now=now + dt.timedelta(minutes=5))
    assert [change.key_id for change, _ in settled] == [young_key] * 3 + [old_key] * 3


def test_the_feed_requires_a_gateway_token(client: FlaskClient, gateway: FlaskClient) -> None:
    assert_error(client.get(FEED), 401, "invalid_api_key")
    wrong = client.get(FEED, headers={"Authorization": "Bearer gw_not-a-token"})
    assert_error(wrong, 401, "invalid_api_key")
    admin = client.get(FEED, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert_error(admin, 401, "invalid_api_key")


def test_a_foreign_cursor_or_limit_is_refused(gateway: FlaskClient) -> None:
    assert_error(gateway.get(f"{FEED}?cursor=bm90LWEtbnVtYmVy"), 400, "invalid_cursor", "cursor")
    assert_error(gateway.get(f"{FEED}?limit=0"), 400, "invalid_request", "limit")
    assert_error(gateway.get(f"{FEED}?limit=1001"), 400, "invalid_request", "limit")


def _decoded(cursor: str) -> str:
    position = decode_cursor(cursor)
    assert position is not None
    return position
