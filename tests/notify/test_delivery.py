"""Signed delivery to a real HTTP receiver, in-process (``delivery.deliver_due``): the
events, their signatures, retries on the schedule with every attempt logged, replay, and the
balance notices (DESIGN 5, 6.4 and 7)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook, WebhookVerificationError

from billing.accounts import accounts, keys
from billing.core.db import utcnow
from billing.core.money import parse_usd
from billing.notify import delivery, endpoints, models
from billing.runtime import Runtime
from tests.notify.conftest import (
    Receiver,
    adjust,
    body_json,
    key_changes,
    new_account,
    new_key,
    register,
    report_usage,
)

# 1000 input and 2000 output tokens of the mini model: $0.00152, more than the $0.001 credit.
OVERDRAW = (1000, 2000)


def deliver(runtime: Runtime, schedule: tuple[float, ...] = (60,)) -> int:
    return delivery.deliver_due(
        runtime.sessions,
        hmac_key=runtime.settings.hmac_key,
        schedule=schedule,
        timeout=5,
        allow_private=runtime.settings.webhook_allow_private_urls,
    )


def delivery_of(admin: FlaskClient, endpoint_id: str, *, index: int = 0) -> dict[str, Any]:
    """The ``index``-th newest delivery of the endpoint, with its event and attempts."""
    listed = admin.get(f"/admin/v1/webhook-endpoints/{endpoint_id}/deliveries").get_json()
    summary = listed["data"][index]
    detail: dict[str, Any] = admin.get(f"/admin/v1/webhook-deliveries/{summary['id']}").get_json()
    return detail


def test_a_key_flipped_to_402_by_settlement_is_announced_signed(
    admin: FlaskClient, gateway: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    register(admin, receiver, ["key.created", "key.state_changed"])
    account_id = new_account(admin, credit="0.001")
    key_id = new_key(admin, account_id)
    report_usage(gateway, key_id, *OVERDRAW)  # settled in-process (embedded), balance < 0

    assert deliver(runtime) == 2  # the new key, then the flip
    created, changed = receiver.requests()
    assert created.type == "key.created"
    assert created.data == {
        "key_id": key_id,
        "account_id": account_id,
        "state": "active",
        "http_status": 200,
        "code": None,
        "sequence": 1,
        "created_at": created.data["created_at"],
    }
    [flip] = key_changes(receiver.requests(), key_id)
    assert flip == {
        "key_id": key_id,
        "account_id": account_id,
        "state": "insufficient_balance",
        "http_status": 402,
        "code": "insufficient_balance",
        "sequence": 2,
        "old_state": "active",
        "new_state": "insufficient_balance",
        "reason": "usage settled",
        "changed_at": flip["changed_at"],
    }
    changed_at = dt.datetime.fromisoformat(flip["changed_at"])
    assert abs(utcnow() - changed_at) < dt.timedelta(minutes=1)
    assert flip["changed_at"].endswith("Z")

    request = changed
    assert request.error is None and request.answered == 200
    assert request.headers["content-type"] == "application/json"
    body = body_json(request)
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "key.state_changed"
    # Globally unique event ids: msg_ and a UUIDv7, one per event.
    ids = [r.headers["webhook-id"] for r in (created, changed)]
    assert len(set(ids)) == 2
    for message_id in ids:
        assert message_id.startswith("msg_")
        assert uuid.UUID(hex=message_id.removeprefix("msg_")).version == 7
    assert abs(time.time() - int(request.headers["webhook-timestamp"])) < 60
    assert request.headers["webhook-signature"].startswith("v1,")

    # Sent once: nothing is due any more.
    assert deliver(runtime) == 0


def test_every_request_verifies_and_a_tampered_one_does_not(
    admin: FlaskClient, gateway: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    register(admin, receiver)
    account_id = new_account(admin, credit="0.001")
    key_id = new_key(admin, account_id)
    report_usage(gateway, key_id, *OVERDRAW)
    deliver(runtime)
    requests = receiver.requests()
    assert requests and all(r.error is None and r.answered == 200 for r in requests)

    flip = next(
        r for r in requests if r.payload and r.data.get("new_state") == "insufficient_balance"
    )
    assert receiver.secret is not None
    verifier = Webhook(receiver.secret)
    assert verifier.verify(flip.body, flip.headers) == body_json(flip)

    forged = flip.body.replace(b'"new_state":"insufficient_balance"', b'"new_state":"active"')
    assert forged != flip.body
    with pytest.raises(WebhookVerificationError):
        verifier.verify(forged, flip.headers)
    with pytest.raises(WebhookVerificationError):
        verifier.verify(flip.body, flip.headers | {"webhook-id": "evt_0"})
    with pytest.raises(WebhookVerificationError):
        verifier.verify(flip.body, flip.headers | {"webhook-signature": "v1,AAAA"})
    stale = str(int(flip.headers["webhook-timestamp"]) - 3600)
    with pytest.raises(WebhookVerificationError):
        verifier.verify(flip.body, flip.headers | {"webhook-timestamp": stale})
    other_secret = admin.post(
        "/admin/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/x"}
    ).get_json()["secret"]
    with pytest.raises(WebhookVerificationError):
        Webhook(other_secret).verify(flip.body, flip.headers)


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_attempt(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    endpoint_id = register(admin, receiver, ["key.created"])
    receiver.script = [500, 500]
    schedule = (0.3, 0.3)
    key_id = new_key(admin, new_account(admin))

    assert deliver(runtime, schedule) == 1
    first = delivery_of(admin, endpoint_id)
    assert first["status"] == "pending"
    assert first["attempts"] == 1
    assert first["last_status_code"] == 500
    assert first["last_error"] == "HTTP 500"
    attempted = dt.datetime.fromisoformat(first["attempt_log"][0]["attempted_at"])
    due = dt.datetime.fromisoformat(first["next_attempt_at"])
    assert dt.timedelta(seconds=0.2) < due - attempted < dt.timedelta(seconds=0.5)
    assert deliver(runtime, schedule) == 0  # not due yet

    for _ in range(2):
        time.sleep(0.35)
        assert deliver(runtime, schedule) == 1

    detail = delivery_of(admin, endpoint_id)
    assert detail["status"] == "succeeded"
    assert detail["attempts"] == 3
    assert detail["delivered_at"] is not None
    assert detail["next_attempt_at"] is None
    assert detail["last_status_code"] == 200 and detail["last_error"] is None
    log = detail["attempt_log"]
    assert [attempt["status_code"] for attempt in log] == [500, 500, 200]
    assert [attempt["error"] for attempt in log] == ["HTTP 500", "HTTP 500", None]
    assert all(attempt["duration_ms"] >= 0 for attempt in log)
    assert detail["event"]["data"]["key_id"] == key_id

    requests = receiver.requests()
    assert [r.answered for r in requests] == [500, 500, 200]
    assert all(r.error is None for r in requests)  # every attempt was signed
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    assert requests[0].headers["webhook-id"] == detail["event_id"]


def test_a_delivery_fails_when_the_schedule_runs_out(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    endpoint_id = register(admin, receiver, ["key.created"])
    receiver.script = [503] * 10
    new_key(admin, new_account(admin))

    assert deliver(runtime, (0, 0)) == 3  # the first attempt and two retries, all due at once
    detail = delivery_of(admin, endpoint_id)
    assert detail["status"] == "failed"
    assert detail["attempts"] == 3
    assert detail["next_attempt_at"] is None
    assert [attempt["status_code"] for attempt in detail["attempt_log"]] == [503, 503, 503]
    assert deliver(runtime, (0, 0)) == 0


def test_an_unreachable_receiver_is_logged_as_an_error(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    endpoint_id = register(admin, receiver, ["key.created"])
    receiver.server.shutdown()
    receiver.server.server_close()  # nothing listens on the port any more
    new_key(admin, new_account(admin))

    assert deliver(runtime, (60,)) == 1
    detail = delivery_of(admin, endpoint_id)
    assert detail["status"] == "pending"
    [attempt] = detail["attempt_log"]
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("ConnectionError")


def test_a_redirect_is_a_failure_and_is_not_followed(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver, second_receiver: Receiver
) -> None:
    endpoint_id = register(admin, receiver, ["key.created"])
    receiver.script = [307]
    receiver.redirect_to = second_receiver.url
    new_key(admin, new_account(admin))
    deliver(runtime)
    detail = delivery_of(admin, endpoint_id)
    assert detail["status"] == "pending"
    assert detail["attempt_log"][0]["status_code"] == 307
    assert [r.answered for r in receiver.requests()] == [307]
    assert second_receiver.requests() == []


def test_replay_redelivers_the_same_signed_event(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    endpoint_id = register(admin, receiver, ["key.created"])
    new_key(admin, new_account(admin))
    assert deliver(runtime) == 1
    original = delivery_of(admin, endpoint_id)
    assert original["status"] == "succeeded"

    response = admin.post(f"/admin/v1/webhook-deliveries/{original['id']}/replay")
    assert response.status_code == 201
    replayed = response.get_json()
    assert replayed["id"] != original["id"]
    assert replayed["replay_of"] == original["id"]
    assert replayed["event_id"] == original["event_id"]
    assert replayed["status"] == "pending" and replayed["attempts"] == 0

    assert deliver(runtime) == 1
    first, second = receiver.requests()
    assert second.error is None and second.answered == 200
    assert second.headers["webhook-id"] == first.headers["webhook-id"] == original["event_id"]
    assert second.body == first.body
    assert delivery_of(admin, endpoint_id)["status"] == "succeeded"  # the newest: the replay


def test_endpoints_get_only_the_event_types_they_subscribed_to(
    admin: FlaskClient,
    gateway: FlaskClient,
    runtime: Runtime,
    receiver: Receiver,
    second_receiver: Receiver,
) -> None:
    register(admin, receiver, ["key.state_changed"])
    register(admin, second_receiver, ["account.balance_low", "account.balance_depleted"])
    account_id = new_account(admin, credit="0.001")
    key_id = new_key(admin, account_id)
    report_usage(gateway, key_id, *OVERDRAW)
    deliver(runtime)

    # Not the key's creation (key.created): only its change to 402.
    assert [r.type for r in receiver.requests()] == ["key.state_changed"]
    assert len(key_changes(receiver.requests(), key_id)) == 1
    [depleted] = second_receiver.requests()
    assert depleted.type == "account.balance_depleted"
    assert depleted.data == {
        "account_id": account_id,
        "balance_usd": "-0.000520000",
        "previous_balance_usd": "0.001000000",
        "ledger_entry_id": depleted.data["ledger_entry_id"],
        "changed_at": depleted.data["changed_at"],
    }
    entries = admin.get(f"/admin/v1/accounts/{account_id}/ledger").get_json()["data"]
    assert depleted.data["ledger_entry_id"] == entries[0]["id"]
    assert entries[0]["kind"] == "usage"


def test_balance_low_is_sent_once_per_crossing(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    register(admin, receiver, ["account.balance_low", "account.balance_depleted"])
    account_id = new_account(admin)
    steps = ["1.50", "-0.60", "-0.10", "1.00", "-1.00", "-0.80", "2.00", "-2.00", "-0.01"]
    for amount in steps:  # balance: 1.50 0.90 0.80 1.80 0.80 0 2.00 0 -0.01
        adjust(admin, account_id, amount)
    deliver(runtime)

    notices = [(r.type, r.data["balance_usd"]) for r in receiver.requests()]
    assert notices == [
        ("account.balance_low", "0.900000000"),  # 1.50 -> 0.90 crosses $1.00
        ("account.balance_low", "0.800000000"),  # 1.80 -> 0.80, after going back above
        ("account.balance_depleted", "0.000000000"),  # 0.80 -> 0: at zero is depleted
        ("account.balance_low", "0.000000000"),  # 2.00 -> 0 crosses both at once
        ("account.balance_depleted", "0.000000000"),
    ]
    low = receiver.requests()[0].data
    assert low["threshold_usd"] == "1.000000000"
    assert low["previous_balance_usd"] == "1.500000000"
    assert all(r.error is None for r in receiver.requests())


def test_the_balance_low_threshold_is_configurable(
    admin: FlaskClient, db: Session, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The setting reaches the ledger as a parameter on every path that moves money: here the
    # admin API's adjustments, with the app's settings changed for this test only.
    configured = runtime.settings.model_copy(update={"balance_low_threshold_usd": "5.00"})
    assert configured.balance_low_threshold == parse_usd("5.00")
    monkeypatch.setattr(runtime, "settings", configured)
    endpoints.create_endpoint(
        db,
        url="http://127.0.0.1:9/x",
        event_types=["account.balance_low"],
        hmac_key=runtime.settings.hmac_key,
        allow_private=True,
        now=utcnow(),
    )
    account_id = new_account(admin, credit="6")
    adjust(admin, account_id, "-0.5")
    adjust(admin, account_id, "-0.6")
    events = db.scalars(
        select(models.WebhookEvent).where(models.WebhookEvent.type == "account.balance_low")
    ).all()
    assert [(e.payload["balance_usd"], e.payload["threshold_usd"]) for e in events] == [
        ("4.900000000", "5.000000000")
    ]


def test_nothing_is_stored_for_an_event_no_endpoint_wants(admin: FlaskClient, db: Session) -> None:
    before = len(db.scalars(select(models.WebhookEvent)).all())
    new_key(admin, new_account(admin, credit="3"))
    adjust(admin, new_account(admin, credit="3"), "-2.5")
    assert len(db.scalars(select(models.WebhookEvent)).all()) == before


def test_a_rolled_back_change_announces_nothing(db: Session, runtime: Runtime) -> None:
    now = utcnow()
    endpoints.create_endpoint(
        db, url="http://127.0.0.1:9/x", event_types=None, hmac_key=b"k", allow_private=True, now=now
    )
    account = accounts.create_account(db, name="t", email=None, now=now)
    settings = keys.KeySettings("k", None, None, None, None)
    with db.begin_nested() as savepoint:
        keys.issue_key(db, account_id=account.id, settings=settings, hmac_key=b"k", now=now)
        db.flush()
        assert len(db.scalars(select(models.WebhookDelivery)).all()) == 1
        savepoint.rollback()
    assert db.scalars(select(models.WebhookDelivery)).all() == []
    assert db.scalars(select(models.WebhookEvent)).all() == []


def test_the_body_is_compact_json_with_the_event_created_at(
    admin: FlaskClient, runtime: Runtime, receiver: Receiver
) -> None:
    register(admin, receiver, ["key.created"])
    new_key(admin, new_account(admin))
    deliver(runtime)
    [request] = receiver.requests()
    body = body_json(request)
    assert request.body == json.dumps(body, separators=(",", ":")).encode()
    assert body["timestamp"] == body["data"]["created_at"]
