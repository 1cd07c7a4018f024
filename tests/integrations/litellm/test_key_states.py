"""billing_litellm.key_states: the cache keeps each key's newest state, whatever the order of
deliveries; webhooks are verified before they are read; the feed is a catch-up."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from billing_litellm.key_states import KeyStateCache, KeyStatePoller, WebhookReceiver

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEY = "sk-" + "a" * 48


def event(state: str, *, sequence: int | None = None, at: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"key_id": "key_1", "account_id": "acct_1", "state": state}
    data["http_status"] = {"active": 200, "revoked": 401, "insufficient_balance": 402}[state]
    data["code"] = {"active": None, "revoked": "invalid_api_key"}.get(state, state)
    if sequence is not None:
        data["sequence"] = sequence
    if at is not None:
        data["changed_at"] = at
    return data


def signed(body: dict[str, Any], message_id: str = "msg_1") -> tuple[bytes, dict[str, str]]:
    payload = json.dumps(body)
    now = dt.datetime.now(dt.UTC)
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(message_id, now, payload),
    }
    return payload.encode(), headers


@pytest.fixture
def cache() -> KeyStateCache:
    known = KeyStateCache()
    known.remember(KEY, "key_1")
    return known


def receive(cache: KeyStateCache, data: dict[str, Any], type_: str = "key.state_changed") -> bool:
    body, headers = signed({"type": type_, "timestamp": "2026-12-02T10:00:00Z", "data": data})
    return WebhookReceiver(SECRET, cache).receive(body, headers)


def test_a_blocked_key_is_refused_and_an_unknown_one_is_not(cache: KeyStateCache) -> None:
    assert receive(cache, event("insufficient_balance", sequence=2))
    held = cache.blocked(KEY, spending=True)
    assert held is not None and (held.http_status, held.code) == (402, "insufficient_balance")
    assert cache.blocked("sk-" + "b" * 48, spending=True) is None  # never answered: not cached


def test_a_key_blocked_from_spending_may_still_use_free_routes(cache: KeyStateCache) -> None:
    receive(cache, event("insufficient_balance", sequence=1))
    assert cache.blocked(KEY, spending=False) is None
    receive(cache, event("revoked", sequence=2))
    assert cache.blocked(KEY, spending=False) is not None


def test_an_older_sequence_never_replaces_a_newer_one(cache: KeyStateCache) -> None:
    assert receive(cache, event("insufficient_balance", sequence=7))
    assert not receive(cache, event("active", sequence=6))  # delivered late: dropped
    assert not receive(cache, event("insufficient_balance", sequence=7))  # a duplicate
    assert cache.blocked(KEY, spending=True) is not None
    assert receive(cache, event("active", sequence=8))
    assert cache.blocked(KEY, spending=True) is None


def test_without_sequences_the_change_time_orders_deliveries(cache: KeyStateCache) -> None:
    # The events of a billing service before v2: new_state and changed_at, no sequence.
    late = {"key_id": "key_1", "new_state": "active", "changed_at": "2026-12-02T10:00:00Z"}
    spent = {
        "key_id": "key_1",
        "new_state": "insufficient_balance",
        "http_status": 402,
        "changed_at": "2026-12-02T10:00:05Z",
    }
    assert receive(cache, spent)
    assert not receive(cache, late)
    held = cache.blocked(KEY, spending=True)
    assert held is not None and held.state == "insufficient_balance"


def test_key_created_events_count_and_other_types_are_ignored(cache: KeyStateCache) -> None:
    assert receive(cache, event("revoked", sequence=1), type_="key.created")
    balance_low = {"account_id": "acct_1", "balance_usd": "0.5", "key_id": "key_1"}
    assert not receive(cache, balance_low | {"state": "active"}, type_="account.balance_low")
    assert cache.blocked(KEY, spending=True) is not None


def test_an_unsigned_or_tampered_webhook_is_refused_before_it_is_read(
    cache: KeyStateCache,
) -> None:
    body, headers = signed({"type": "key.state_changed", "data": event("revoked", sequence=1)})
    receiver = WebhookReceiver(SECRET, cache)
    with pytest.raises(WebhookVerificationError):
        receiver.receive(body.replace(b"revoked", b"active_"), headers)
    with pytest.raises(WebhookVerificationError):
        receiver.receive(body, headers | {"webhook-signature": "v1,AAAA"})
    with pytest.raises(WebhookVerificationError):
        WebhookReceiver("whsec_" + "Z" * 32, cache).receive(body, headers)
    assert cache.blocked(KEY, spending=True) is None


def test_the_poller_reads_the_feed_to_its_end_and_resumes_from_its_cursor(
    cache: KeyStateCache,
) -> None:
    pages = {
        None: ([event("insufficient_balance", at="2026-12-02T10:00:00Z")], "c1", True),
        "c1": ([event("revoked", at="2026-12-02T10:00:01Z")], "c2", False),
        "c2": ([], "c2", False),
    }
    asked: list[str | None] = []

    def fetch(cursor: str | None) -> tuple[list[Mapping[str, Any]], str, bool]:
        asked.append(cursor)
        items, next_cursor, more = pages[cursor]
        return (
            [{**item, "state": None, "new_state": item["state"]} for item in items],
            next_cursor,
            more,
        )

    poller = KeyStatePoller(fetch, cache, interval=60)
    assert poller.poll_once() == 2
    assert poller.poll_once() == 0
    assert asked == [None, "c1", "c2"]
    held = cache.blocked(KEY, spending=False)
    assert held is not None and held.state == "revoked"
