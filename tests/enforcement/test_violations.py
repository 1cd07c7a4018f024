"""Content-policy violations: every report recorded once, the threshold within the window
suspending the key at 451, and an operator clearing it (DESIGN 5, 6.3)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.accounts import violations
from billing.core.db import utcnow
from billing.core.settings import Settings
from billing.enforcement import mirror
from billing.runtime import Runtime
from tests.conftest import TEST_REDIS_URL
from tests.enforcement.support import new_account, rid, state_changes
from tests.support import assert_error, key_state, mirrored_state, new_key

VIOLATIONS = "/gateway/v1/violations"
SUSPENDED_REASON = "3 content violations in 24h"


def report(gateway: FlaskClient, key: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {"request_id": rid(), "key_id": key["id"], "category": "violence", **fields}
    response = gateway.post(VIOLATIONS, json=body)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def listed(admin: FlaskClient, key_id: str) -> list[dict[str, Any]]:
    response = admin.get(f"/admin/v1/keys/{key_id}/violations", query_string={"limit": 100})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["data"]


def suspend(gateway: FlaskClient, key: dict[str, Any]) -> None:
    for _ in range(3):
        answer = report(gateway, key)
    assert answer["suspended"] is True


def test_violations_below_the_threshold_are_recorded_and_do_not_suspend(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin, new_account(admin))
    first = report(gateway, key, category="self-harm", detail="flagged by the moderation model")
    assert first == {
        "object": "violation",
        "id": first["id"],
        "key_id": key["id"],
        "state": "active",
        "suspended": False,
        "duplicate": False,
    }
    second = report(gateway, key, api_key=None)
    assert (second["state"], second["suspended"]) == ("active", False)
    assert key_state(admin, key["id"]) == ("active", 200)

    rows = listed(admin, key["id"])
    assert [row["id"] for row in rows] == [second["id"], first["id"]]  # newest first
    assert rows[1]["category"] == "self-harm"
    assert rows[1]["detail"] == "flagged by the moderation model"
    assert rows[1]["account_id"] == key["account_id"]
    assert rows[1]["cleared_at"] is None


def test_the_threshold_within_the_window_suspends_the_key_at_451(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin, new_account(admin))
    other = new_key(admin, key["account_id"])
    report(gateway, key)
    report(gateway, other)  # the count is per key
    report(gateway, key, api_key=key["key"], key_id=None)  # by the secret, too
    third = report(gateway, key)
    assert (third["state"], third["suspended"], third["duplicate"]) == ("suspended", True, False)

    assert key_state(admin, key["id"]) == ("suspended", 451)
    assert state_changes(db, key["id"])[-1] == ("active", "suspended", SUSPENDED_REASON)
    assert key_state(admin, other["id"]) == ("active", 200)

    # Later reports are still recorded; the suspension (and its reason) stands.
    fourth = report(gateway, key)
    assert (fourth["state"], fourth["suspended"]) == ("suspended", True)
    assert len(listed(admin, key["id"])) == 4
    assert [new for _, new, _ in state_changes(db, key["id"])].count("suspended") == 1


def test_violations_older_than_the_window_do_not_count(
    admin: FlaskClient, gateway: FlaskClient, db: Session, runtime: Runtime
) -> None:
    key = new_key(admin, new_account(admin))
    now = utcnow()
    policy = violations.Policy(threshold=3, window=dt.timedelta(hours=24))

    def at(when: dt.datetime) -> violations.Reported:
        return violations.report(
            db,
            request_id=rid(),
            key_id=key["id"],
            category="violence",
            detail=None,
            policy=policy,
            hmac_key=runtime.settings.hmac_key,
            now=when,
        )

    # Never three within 24 hours of each other: each report counts the window ending at it.
    for hours in (50, 25, 23):
        assert at(now - dt.timedelta(hours=hours)).key.suspended_at is None
    db.flush()
    assert report(gateway, key)["suspended"] is False  # two in the window
    assert key_state(admin, key["id"]) == ("active", 200)
    assert report(gateway, key)["suspended"] is True  # three in the window
    assert key_state(admin, key["id"]) == ("suspended", 451)


def test_the_policy_is_configurable(admin: FlaskClient, db: Session, runtime: Runtime) -> None:
    defaults = Settings(_env_file=None)
    assert (defaults.violation_threshold, defaults.violation_window_hours) == (3, 24)
    assert Settings(_env_file=None, violation_window_hours="1.5").violation_window_hours == 1.5
    key = new_key(admin, new_account(admin))
    result = violations.report(
        db,
        request_id=rid(),
        key_id=key["id"],
        category="violence",
        detail=None,
        policy=violations.Policy(threshold=1, window=dt.timedelta(minutes=90)),
        hmac_key=runtime.settings.hmac_key,
        now=utcnow(),
    )
    assert result.key.state == "suspended"
    assert state_changes(db, key["id"])[-1] == (
        "active",
        "suspended",
        "1 content violations in 1.5h",
    )


def test_a_repeated_report_is_a_duplicate_and_does_not_count(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin, new_account(admin))
    request_id = rid()
    first = report(gateway, key, request_id=request_id)
    for category in ("violence", "hate"):  # the first report of a request stands
        again = report(gateway, key, request_id=request_id, category=category)
        assert again == {**first, "duplicate": True}
    assert [row["category"] for row in listed(admin, key["id"])] == ["violence"]
    assert key_state(admin, key["id"]) == ("active", 200)

    # The same request id on another key is that key's violation.
    other = new_key(admin, key["account_id"])
    assert report(gateway, other, request_id=request_id)["duplicate"] is False


def test_unsuspending_returns_the_key_to_active_and_cleared_violations_no_longer_count(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin, new_account(admin))
    suspend(gateway, key)
    response = admin.post(f"/admin/v1/keys/{key['id']}/unsuspend")
    assert response.status_code == 200, response.get_json()
    assert (response.get_json()["state"], response.get_json()["http_status"]) == ("active", 200)
    assert key_state(admin, key["id"]) == ("active", 200)
    assert state_changes(db, key["id"])[-1] == (
        "suspended",
        "active",
        "violations cleared by an operator",
    )
    assert all(row["cleared_at"] is not None for row in listed(admin, key["id"]))

    # The cleared violations are still in the window but count no more.
    assert report(gateway, key)["suspended"] is False
    assert report(gateway, key)["suspended"] is False
    assert report(gateway, key)["suspended"] is True

    # Unsuspending is audited, and harmless on a key that is not suspended.
    admin.post(f"/admin/v1/keys/{key['id']}/unsuspend")
    again = admin.post(f"/admin/v1/keys/{key['id']}/unsuspend")
    assert again.status_code == 200 and again.get_json()["state"] == "active"
    audit = admin.get("/admin/v1/audit-log").get_json()["data"]
    assert audit[0]["action"] == "POST /admin/v1/keys/<key_id>/unsuspend"
    assert audit[0]["target_id"] == key["id"]


def test_451_wins_over_402_and_unsuspending_an_empty_account_leaves_402(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    key = new_key(admin, new_account(admin, credit="0"))
    assert key_state(admin, key["id"]) == ("insufficient_balance", 402)
    suspend(gateway, key)
    assert key_state(admin, key["id"]) == ("suspended", 451)
    admin.post(f"/admin/v1/keys/{key['id']}/unsuspend")
    assert key_state(admin, key["id"]) == ("insufficient_balance", 402)
    assert state_changes(db, key["id"])[-1][:2] == ("suspended", "insufficient_balance")


def test_revoked_beats_suspended(admin: FlaskClient, gateway: FlaskClient, db: Session) -> None:
    suspended = new_key(admin, new_account(admin))
    suspend(gateway, suspended)
    admin.post(f"/admin/v1/keys/{suspended['id']}/revoke")
    assert key_state(admin, suspended["id"]) == ("revoked", 401)
    admin.post(f"/admin/v1/keys/{suspended['id']}/unsuspend")
    assert key_state(admin, suspended["id"]) == ("revoked", 401)

    revoked = new_key(admin, suspended["account_id"])
    admin.post(f"/admin/v1/keys/{revoked['id']}/revoke")
    for _ in range(3):
        answer = report(gateway, revoked)
    assert (answer["state"], answer["suspended"]) == ("revoked", True)
    assert key_state(admin, revoked["id"]) == ("revoked", 401)


def test_report_errors(admin: FlaskClient, gateway: FlaskClient, client: FlaskClient) -> None:
    key = new_key(admin, new_account(admin))
    base = {"request_id": rid(), "category": "violence"}
    assert_error(
        gateway.post(VIOLATIONS, json={**base, "api_key": "sk-" + "x" * 48}),
        400,
        "invalid_api_key",
        "api_key",
    )
    assert_error(
        gateway.post(VIOLATIONS, json={**base, "key_id": "key_nope"}),
        400,
        "invalid_api_key",
        "key_id",
    )
    for names in ({}, {"key_id": key["id"], "api_key": key["key"]}):
        assert_error(gateway.post(VIOLATIONS, json={**base, **names}), 400, "invalid_request")
    for field, value in (
        ("colour", "red"),
        ("detail", "x" * 2001),
        ("category", ""),
        ("request_id", ""),
    ):
        assert_error(
            gateway.post(VIOLATIONS, json={**base, "key_id": key["id"], field: value}),
            400,
            "invalid_request",
            field,
        )
    assert_error(
        client.post(VIOLATIONS, json={**base, "key_id": key["id"]}), 401, "invalid_api_key"
    )
    assert listed(admin, key["id"]) == []

    assert_error(admin.post("/admin/v1/keys/key_nope/unsuspend"), 404, "not_found")
    assert_error(admin.get("/admin/v1/keys/key_nope/violations"), 404, "not_found")
    assert_error(client.post(f"/admin/v1/keys/{key['id']}/unsuspend"), 401, "invalid_api_key")


def test_the_violation_routes_are_documented(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "post" in paths["/gateway/v1/violations"]
    assert "post" in paths["/admin/v1/keys/{key_id}/unsuspend"]
    assert "get" in paths["/admin/v1/keys/{key_id}/violations"]


def test_the_suspension_and_its_clearing_reach_the_redis_mirror(
    admin: FlaskClient,
    gateway: FlaskClient,
    db: Session,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = new_key(admin, new_account(admin))
    client = redis.Redis.from_url(TEST_REDIS_URL)
    monkeypatch.setattr(runtime, "redis", client)
    try:
        suspend(gateway, key)
        assert mirrored_state(client, key["id"])["state"] == "suspended"
        assert mirrored_state(client, key["id"])["http_status"] == "451"
        admin.post(f"/admin/v1/keys/{key['id']}/unsuspend")
        assert mirrored_state(client, key["id"])["state"] == "active"
    finally:
        client.delete(mirror.key_name(key["id"]))
