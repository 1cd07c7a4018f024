"""GET /readyz: 200 with each check when the deployment can take traffic, otherwise a 503 in the
OpenAI error shape naming every failing check, never a 500."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from billing.app import create_app
from billing.core.db import utcnow
from billing.metering.usage_events import EventStatus, UsageEvent
from tests.conftest import TEST_REDIS_URL, make_settings
from tests.localstripe import free_port
from tests.metering.support import funded_key
from tests.support import assert_error

CHECKS = {"database", "migrations", "settlement_lag", "redis"}


def ready(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    assert body["status"] == "ready"
    return body["checks"]


def not_ready(client: FlaskClient) -> str:
    error = assert_error(client.get("/readyz"), 503, "not_ready")
    assert error["type"] == "server_error"
    message: str = error["message"]
    return message


def pending_event(db: Session, key_id: str, account_id: str, *, received: dt.datetime) -> None:
    db.add(
        UsageEvent(
            request_id=f"req-{uuid.uuid4()}",
            content_hash="0" * 64,
            account_id=account_id,
            key_id=key_id,
            model="doubao-seed-2-0-lite",
            input_tokens=10,
            cached_tokens=0,
            output_tokens=10,
            reasoning_tokens=0,
            outcome="completed",
            occurred_at=received,
            received_at=received,
            status=EventStatus.PENDING,
        )
    )
    db.flush()


def test_a_migrated_database_without_redis_is_ready(client: FlaskClient) -> None:
    checks = ready(client)
    assert set(checks) == CHECKS
    assert all(check["ok"] for check in checks.values()), checks
    assert "not configured" in checks["redis"]["detail"]
    assert checks["settlement_lag"]["detail"] == "no usage event is waiting for settlement"


def account_key(admin: FlaskClient) -> tuple[str, str]:
    key = funded_key(admin)
    account_id: str = admin.get(f"/admin/v1/keys/{key['id']}").get_json()["account_id"]
    return key["id"], account_id


def test_settlement_lag_under_the_threshold_is_ready(
    client: FlaskClient, admin: FlaskClient, db: Session
) -> None:
    pending_event(db, *account_key(admin), received=utcnow() - dt.timedelta(seconds=100))
    check = ready(client)["settlement_lag"]
    assert check["ok"] is True
    assert "pending usage event is 10" in check["detail"]  # 100 s, or 101 on a slow machine


def test_settlement_lag_over_the_threshold_is_not_ready(
    client: FlaskClient, admin: FlaskClient, db: Session
) -> None:
    pending_event(db, *account_key(admin), received=utcnow() - dt.timedelta(seconds=900))
    message = not_ready(client)
    assert "settlement_lag" in message and "limit 300 s" in message
    assert "database" not in message and "migrations" not in message


def test_a_database_behind_the_migrations_is_not_ready(client: FlaskClient, db: Session) -> None:
    db.execute(text("UPDATE alembic_version SET version_num = 'an_old_revision'"))
    db.flush()
    message = not_ready(client)
    assert "migrations: database at an_old_revision" in message
    assert "settlement_lag" not in message


def test_redis_is_checked_when_configured(tmp_path: Path, migrated_database: str) -> None:
    reachable = create_app(make_settings(tmp_path, redis_url=TEST_REDIS_URL)).test_client()
    assert ready(reachable)["redis"] == {"ok": True, "detail": "reachable"}

    gone = f"redis://127.0.0.1:{free_port()}/0"
    unreachable = create_app(make_settings(tmp_path, redis_url=gone)).test_client()
    message = not_ready(unreachable)
    assert message.startswith("Not ready: redis: unreachable")


def test_an_unreachable_database_is_a_503_not_a_500(tmp_path: Path) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    client = create_app(make_settings(tmp_path, database_url=nowhere)).test_client()
    message = not_ready(client)
    assert message.startswith("Not ready: database: unreachable")
    assert "migrations" not in message  # not checked without a database
    assert "127.0.0.1" not in message  # an unauthenticated route says nothing of the set-up


def test_readyz_is_documented(client: FlaskClient) -> None:
    operation = client.get("/openapi.json").get_json()["paths"]["/readyz"]["get"]
    assert {"200", "503"} <= set(operation["responses"])
    assert "security" not in operation
