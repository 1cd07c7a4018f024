"""The gauges read at scrape time (``billing.health.gauges``) against the real PostgreSQL: what is
pending, parked and held, before and after settlement."""

from __future__ import annotations

import datetime as dt
import socket
import uuid

import redis
from flask.testing import FlaskClient
from prometheus_client.metrics_core import Metric
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from billing.enforcement.hotpath import HotPath
from billing.health import gauges
from billing.metering import settlement, usage_events
from billing.runtime import Runtime
from tests.api.admin.support import adjust, new_account
from tests.support import new_key


def values(families: list[Metric]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for family in families
        for sample in family.samples
    }


def test_lag_is_the_age_of_the_oldest_pending_event_and_zero_once_settled(
    admin: FlaskClient, db: Session, runtime: Runtime
) -> None:
    account_id = new_account(admin)
    adjust(admin, account_id, "10.00")
    key_id = new_key(admin, account_id)["id"]
    now = utcnow()
    events = [
        {"request_id": str(uuid.uuid4()), "key_id": key_id, "model": model, "input_tokens": 5}
        for model in ("doubao-seed-2-0-mini", "doubao-seed-2-0-mini", "no-such-model")
    ]
    for minutes, event in zip((3, 2, 1), events, strict=True):
        result = usage_events.ingest(
            db,
            [event],
            prefix_items=False,
            hmac_key=runtime.settings.hmac_key,
            max_age=runtime.settings.usage_max_age,
            now=now - dt.timedelta(minutes=minutes),
        )
        assert result.accepted == 1
    db.flush()

    pending = values(gauges.scrape(db, None, now=now))
    assert pending[("billing_settlement_lag_seconds", ())] == 180
    assert pending[("billing_usage_unpriced_events", ())] == 0

    settled = settlement.settle_batch(db, low_balance_nanos=0, now=now)
    assert (settled.settled, settled.unpriced) == (2, 1)
    after = values(gauges.scrape(db, None, now=now))
    assert after[("billing_settlement_lag_seconds", ())] == 0
    assert after[("billing_usage_unpriced_events", ())] == 1
    # No Redis: only the PostgreSQL holds are shown.
    assert ("billing_open_holds", ("postgres",)) in after
    assert ("billing_open_holds", ("redis",)) not in after


def test_an_unreachable_redis_leaves_its_holds_out(db: Session) -> None:
    # A port bound but never listening: connections to it are refused.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        unreachable = HotPath(redis.Redis(port=port, socket_connect_timeout=0.5))
        scraped = values(gauges.scrape(db, unreachable, now=utcnow()))
    assert ("billing_open_holds", ("postgres",)) in scraped
    assert ("billing_open_holds", ("redis",)) not in scraped
    assert ("billing_open_holds_nanodollars", ("redis",)) not in scraped
