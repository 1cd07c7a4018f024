"""The gauges read at scrape time: what PostgreSQL (and Redis) hold, not what a process did.

Read by ``GET /metrics`` in one short transaction of cheap queries, each served by a partial
index (pending events, unpriced events, open holds, pending deliveries), so a scrape costs in
proportion to what is waiting, not to the size of the tables. The Redis holds are read page by
page (``HotPath.open_holds``) and left out when Redis is unreachable: the gauges say what is
known.
"""

from __future__ import annotations

import datetime as dt
import logging

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.enforcement.hotpath import HotPath
from billing.ledger.holds import Hold
from billing.metering import settlement
from billing.metering.usage_events import EVENTS, EventStatus
from billing.notify.models import DeliveryStatus, WebhookDelivery

log = logging.getLogger(__name__)


def _age(then: dt.datetime | None, now: dt.datetime) -> float:
    if then is None:
        return 0.0
    if then.tzinfo is None:  # SQLite hands back naive UTC
        then = then.replace(tzinfo=dt.UTC)
    return max((now - then).total_seconds(), 0.0)


def scrape(session: Session, hotpath: HotPath | None, *, now: dt.datetime) -> list[Metric]:
    """The gauges as of ``now``."""
    lag_behind = settlement.settlement_lag(session, now=now)
    unpriced = session.scalar(
        select(func.count()).select_from(EVENTS).where(EVENTS.c.status == EventStatus.UNPRICED)
    )
    held_count, held_nanos = session.execute(
        select(func.count(), func.coalesce(func.sum(Hold.amount_nanos), 0)).where(
            Hold.released_at.is_(None)
        )
    ).one()
    pending_deliveries, oldest_delivery = session.execute(
        select(func.count(), func.min(WebhookDelivery.created_at)).where(
            WebhookDelivery.status == DeliveryStatus.PENDING
        )
    ).one()

    lag = GaugeMetricFamily(
        "billing_settlement_lag_seconds",
        "Age of the oldest usage event waiting to be settled; 0 when none waits.",
        value=0.0 if lag_behind is None else lag_behind.total_seconds(),
    )
    parked = GaugeMetricFamily(
        "billing_usage_unpriced_events",
        "Usage events parked for want of a price (GET /admin/v1/usage/unpriced names the models).",
        value=unpriced or 0,
    )
    holds = GaugeMetricFamily(
        "billing_open_holds", "Open authorize holds, by store (postgres, redis).", labels=["store"]
    )
    holds_nanos = GaugeMetricFamily(
        "billing_open_holds_nanodollars",
        "Nano-dollars reserved by open authorize holds, by store (postgres, redis).",
        labels=["store"],
    )
    holds.add_metric(["postgres"], held_count)
    holds_nanos.add_metric(["postgres"], int(held_nanos))
    if hotpath is not None:
        try:
            redis_count, redis_nanos = hotpath.open_holds()
        except redis.RedisError:
            log.warning("Redis unavailable: /metrics shows no Redis holds")
        else:
            holds.add_metric(["redis"], redis_count)
            holds_nanos.add_metric(["redis"], redis_nanos)
    deliveries = GaugeMetricFamily(
        "billing_webhook_deliveries_pending",
        "Gateway webhook deliveries not yet delivered and still being tried.",
        value=pending_deliveries,
    )
    oldest = GaugeMetricFamily(
        "billing_webhook_oldest_undelivered_age_seconds",
        "Age of the oldest webhook delivery still being tried; 0 when none is.",
        value=_age(oldest_delivery, now),
    )
    return [lag, parked, holds, holds_nanos, deliveries, oldest]
