"""Gateway webhooks: signed notices of key-state and balance changes (DESIGN 6.4).

Invariants:
- An event is written to an outbox (``webhook_events``), with one delivery per enabled endpoint
  subscribed to its type, in the same transaction as the change it announces: a change that
  rolls back announces nothing, and a committed one is never lost. An event no endpoint
  subscribes to is not stored (``key_state_changes`` and the ledger keep the history).
- Delivery is at least once, in no guaranteed order. Each request carries the Standard Webhooks
  headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``); ``webhook-id`` is the
  event's id, the same on every attempt and replay, so receivers drop duplicates by it. A
  delivery is claimed (``FOR UPDATE SKIP LOCKED``) by moving its next attempt one lease ahead
  and committing, so no transaction stays open across the HTTP request; a worker that dies
  mid-request leaves the delivery to be retried when the lease runs out.
- Every attempt that completes is recorded (``webhook_attempts``), with the status code or the
  error and the duration. A failed attempt n is retried after ``RETRY_SCHEDULE[n - 1]``
  seconds; after the last, the delivery is ``failed``. A replay is a new delivery of the same
  event.
- Endpoint secrets (``whsec_`` + base64 of 32 bytes) are shown once, at creation, and never
  stored: each is derived when needed as HMAC-SHA256(server secret, endpoint id and a random
  salt), so a copy of the database cannot sign events (a forged ``key.state_changed`` could
  reopen blocked keys at the gateway). Changing ``SECRET_KEY`` changes every endpoint's secret.
- Balance events compare the balance before and after each ledger entry, computed from the
  atomic increment itself, so concurrent entries each see their own crossing: the notice is
  sent once per crossing of the threshold (or of zero) from above.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, Integer, String, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship, sessionmaker
from standardwebhooks import Webhook

from billing.core.db import Base, BigIntId, newest_first, transaction, utcnow
from billing.core.effects import mark_webhooks_pending
from billing.core.errors import Conflict, InvalidRequest, NotFound
from billing.core.ids import new_id, random_base62
from billing.core.money import Nanos, format_usd

log = logging.getLogger(__name__)


class EventType(enum.StrEnum):
    """What an endpoint can subscribe to."""

    KEY_STATE_CHANGED = "key.state_changed"
    BALANCE_LOW = "account.balance_low"
    BALANCE_DEPLETED = "account.balance_depleted"
    TOPUP_SUCCEEDED = "topup.succeeded"
    AUTO_RECHARGE_FAILED = "auto_recharge.failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# Seconds to wait after failed attempt 1, 2, ...; after the last retry the delivery has failed
# (7 attempts over about 7 hours 13 minutes). ``WEBHOOK_RETRY_SCHEDULE`` overrides it.
RETRY_SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 3600, 21600)
# How long one request may take (connect, and each read), in seconds.
DEFAULT_TIMEOUT = 5.0
# A claimed delivery is retried this long after its request's timeout if its worker is gone.
LEASE_MARGIN = dt.timedelta(seconds=30)
DEFAULT_BALANCE_LOW_THRESHOLD: Nanos = 1_000_000_000
# Where a session carries the configured balance-low threshold (see ``session_info``).
BALANCE_LOW_THRESHOLD = "webhooks.balance_low_threshold_nanos"
SECRET_PREFIX = "whsec_"  # noqa: S105  # the Standard Webhooks prefix, not a secret
MAX_URL_LENGTH = 2000


class WebhookEndpoint(Base):
    """A URL of a gateway that receives events of the types it subscribed to."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(String(MAX_URL_LENGTH))
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret_salt: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]
    disabled_at: Mapped[dt.datetime | None]


class WebhookEvent(Base):
    """One event to announce; its payload is the ``data`` of the signed body."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        CheckConstraint(
            "type IN ('key.state_changed', 'account.balance_low', 'account.balance_depleted',"
            " 'topup.succeeded', 'auto_recharge.failed')",
            name="type_known",
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime]

    @property
    def message_id(self) -> str:
        """The ``webhook-id`` header: stable across attempts and replays."""
        return message_id(self.id)


class WebhookDelivery(Base):
    """One event to one endpoint, until it succeeds or its retries run out."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="status_known"),
        CheckConstraint(
            "(status = 'pending') = (next_attempt_at IS NOT NULL)", name="pending_is_scheduled"
        ),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    replay_of: Mapped[int | None] = mapped_column(ForeignKey("webhook_deliveries.id"))
    status: Mapped[str] = mapped_column(String(12))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[dt.datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    delivered_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]

    event: Mapped[WebhookEvent] = relationship(lazy="joined", innerjoin=True)


class WebhookAttempt(Base):
    """One HTTP request of a delivery and how it ended."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        CheckConstraint("status_code IS NOT NULL OR error IS NOT NULL", name="has_outcome"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempted_at: Mapped[dt.datetime]
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer)


class EndpointNotFound(NotFound):
    """No webhook endpoint has that id."""


class DeliveryNotFound(NotFound):
    """No webhook delivery has that id."""


class EndpointDisabled(Conflict):
    """The endpoint is disabled: nothing is sent to it any more."""

    code = "endpoint_disabled"


def message_id(event_id: int) -> str:
    """The public id of an event, sent as ``webhook-id``."""
    return f"evt_{event_id}"


def rfc3339(moment: dt.datetime) -> str:
    """An instant as RFC 3339 UTC, as every payload carries times."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


# Endpoints


def endpoint_secret(endpoint: WebhookEndpoint, *, hmac_key: bytes) -> str:
    """The signing secret of ``endpoint``, derived from the server secret (never stored)."""
    digest = hmac.new(
        hmac_key, f"webhook-endpoint:{endpoint.id}:{endpoint.secret_salt}".encode(), hashlib.sha256
    ).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


def _checked_url(url: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(
            "url must be an absolute http:// or https:// URL with a host.", param="url"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(
            "url must not carry credentials: the signature authenticates each request.",
            param="url",
        )
    if port == 0 or len(url) > MAX_URL_LENGTH:
        raise InvalidRequest("url is not a usable URL.", param="url")
    return url


def _checked_types(event_types: Sequence[str] | None) -> list[str]:
    known = {str(kind) for kind in EventType}
    if event_types is None:
        return sorted(known)
    unknown = sorted(set(event_types) - known)
    if unknown:
        raise InvalidRequest(
            f"event_types: unknown {', '.join(map(repr, unknown))}; known are"
            f" {', '.join(sorted(known))}.",
            param="event_types",
        )
    if not event_types:
        raise InvalidRequest("event_types must name at least one event type.", param="event_types")
    return sorted(set(event_types))


def create_endpoint(
    session: Session,
    *,
    url: str,
    event_types: Sequence[str] | None,
    hmac_key: bytes,
    now: dt.datetime,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint (default: every event type); returns it with its secret, shown once.

    Raises InvalidRequest for a URL that is not http(s) with a host, or an unknown event type.
    """
    endpoint = WebhookEndpoint(
        id=new_id("whe"),
        url=_checked_url(url),
        event_types=_checked_types(event_types),
        secret_salt=random_base62(32),
        created_at=now,
    )
    session.add(endpoint)
    session.flush()
    return endpoint, endpoint_secret(endpoint, hmac_key=hmac_key)


def list_endpoints(session: Session) -> list[WebhookEndpoint]:
    """Every endpoint, oldest first, disabled ones included."""
    return list(session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.id)))


def get_endpoint(session: Session, endpoint_id: str) -> WebhookEndpoint:
    """The endpoint with that id; raises EndpointNotFound."""
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        raise EndpointNotFound(f"No webhook endpoint with id {endpoint_id!r}.", param="endpoint_id")
    return endpoint


def disable_endpoint(session: Session, endpoint_id: str, *, now: dt.datetime) -> WebhookEndpoint:
    """Stop sending to an endpoint; its pending deliveries fail. Disabling twice is harmless."""
    endpoint = get_endpoint(session, endpoint_id)
    if endpoint.disabled_at is None:
        endpoint.disabled_at = now
        pending = session.scalars(
            select(WebhookDelivery).where(
                WebhookDelivery.endpoint_id == endpoint.id,
                WebhookDelivery.status == DeliveryStatus.PENDING,
            )
        )
        for delivery in pending:
            _give_up(delivery, "endpoint disabled")
    return endpoint


# Emitting (in the transaction of the change)


def emit(
    session: Session, type_: EventType, payload: dict[str, Any], *, now: dt.datetime
) -> WebhookEvent | None:
    """Queue an event for every enabled endpoint subscribed to ``type_``; None if there is none.

    Adds rows without flushing, so callers may emit before the rows the payload names are
    flushed (a new key announces its first state before it is added to the session).
    """
    with session.no_autoflush:
        endpoints = session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.disabled_at.is_(None))
            .order_by(WebhookEndpoint.id)
        ).all()
    subscribed = [endpoint for endpoint in endpoints if type_ in endpoint.event_types]
    if not subscribed:
        return None
    event = WebhookEvent(type=type_, payload=payload, created_at=now)
    session.add(event)
    for endpoint in subscribed:
        session.add(
            WebhookDelivery(
                event=event,
                endpoint_id=endpoint.id,
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    mark_webhooks_pending(session)
    return event


def announce_key_state(
    session: Session,
    *,
    key_id: str,
    account_id: str,
    old_state: str | None,
    new_state: str,
    http_status: int,
    reason: str,
    now: dt.datetime,
) -> None:
    """Emit ``key.state_changed`` (``old_state`` is null for a new key)."""
    emit(
        session,
        EventType.KEY_STATE_CHANGED,
        {
            "key_id": key_id,
            "account_id": account_id,
            "old_state": old_state,
            "new_state": new_state,
            "http_status": http_status,
            "reason": reason,
            "changed_at": rfc3339(now),
        },
        now=now,
    )


def session_info(balance_low_threshold: Nanos) -> dict[str, Any]:
    """What sessions must carry for the balance notices (give it to the sessionmaker)."""
    return {BALANCE_LOW_THRESHOLD: balance_low_threshold}


def announce_balance(
    session: Session,
    *,
    account_id: str,
    before: Nanos,
    after: Nanos,
    ledger_entry_id: int,
    now: dt.datetime,
) -> None:
    """Emit ``account.balance_low`` and ``account.balance_depleted`` when a balance crosses the
    threshold (the session's, default $1.00) or zero from above."""
    threshold: Nanos = session.info.get(BALANCE_LOW_THRESHOLD, DEFAULT_BALANCE_LOW_THRESHOLD)
    common = {
        "account_id": account_id,
        "balance_usd": format_usd(after),
        "previous_balance_usd": format_usd(before),
        "ledger_entry_id": ledger_entry_id,
        "changed_at": rfc3339(now),
    }
    if before > threshold >= after:
        emit(
            session,
            EventType.BALANCE_LOW,
            common | {"threshold_usd": format_usd(threshold)},
            now=now,
        )
    if before > 0 >= after:
        emit(session, EventType.BALANCE_DEPLETED, common, now=now)


def announce_top_up(
    session: Session,
    *,
    account_id: str,
    payment_id: str,
    source: str,
    amount: Nanos,
    balance: Nanos,
    ledger_entry_id: int,
    now: dt.datetime,
) -> None:
    """Emit ``topup.succeeded``: a Stripe payment (``source`` top_up or auto_recharge) was
    credited."""
    emit(
        session,
        EventType.TOPUP_SUCCEEDED,
        {
            "account_id": account_id,
            "payment_id": payment_id,
            "source": source,
            "amount_usd": format_usd(amount),
            "balance_usd": format_usd(balance),
            "ledger_entry_id": ledger_entry_id,
            "succeeded_at": rfc3339(now),
        },
        now=now,
    )


def announce_auto_recharge_failed(
    session: Session,
    *,
    account_id: str,
    payment_id: str,
    amount: Nanos,
    reason: str,
    retry_after: dt.datetime,
    now: dt.datetime,
) -> None:
    """Emit ``auto_recharge.failed``: an off-session charge was declined; none is tried again
    before ``retry_after``."""
    emit(
        session,
        EventType.AUTO_RECHARGE_FAILED,
        {
            "account_id": account_id,
            "payment_id": payment_id,
            "amount_usd": format_usd(amount),
            "reason": reason,
            "retry_after": rfc3339(retry_after),
            "failed_at": rfc3339(now),
        },
        now=now,
    )


# Deliveries


def deliveries(
    session: Session,
    endpoint_id: str,
    *,
    status: DeliveryStatus | None = None,
    before: int | None,
    limit: int,
) -> list[WebhookDelivery]:
    """An endpoint's deliveries (with ``status``, if given), newest first, starting before the
    delivery id ``before``; raises EndpointNotFound."""
    get_endpoint(session, endpoint_id)
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    page = newest_first(query, WebhookDelivery.id, before=before, limit=limit)
    return list(session.scalars(page))


def get_delivery(session: Session, delivery_id: int) -> WebhookDelivery:
    """The delivery with that id; raises DeliveryNotFound."""
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        raise DeliveryNotFound(f"No webhook delivery with id {delivery_id}.", param="delivery_id")
    return delivery


def attempts(session: Session, delivery_id: int) -> list[WebhookAttempt]:
    """Every attempt of a delivery, oldest first."""
    return list(
        session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.id)
        )
    )


def replay(session: Session, delivery_id: int, *, now: dt.datetime) -> WebhookDelivery:
    """A new delivery of the same event to the same endpoint, due now (same ``webhook-id``).

    Raises DeliveryNotFound, or EndpointDisabled if the endpoint no longer receives events.
    """
    original = get_delivery(session, delivery_id)
    endpoint = get_endpoint(session, original.endpoint_id)
    if endpoint.disabled_at is not None:
        raise EndpointDisabled(
            f"Webhook endpoint {endpoint.id} is disabled; nothing is sent to it.",
            param="delivery_id",
        )
    delivery = WebhookDelivery(
        event_id=original.event_id,
        endpoint_id=original.endpoint_id,
        replay_of=original.id,
        status=DeliveryStatus.PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    session.flush()
    mark_webhooks_pending(session)
    return delivery


@dataclass(frozen=True)
class _Claim:
    delivery_id: int
    attempt: int
    url: str
    secret: str
    message_id: str
    body: str


@dataclass(frozen=True)
class _Outcome:
    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _give_up(delivery: WebhookDelivery, error: str) -> None:
    delivery.status = DeliveryStatus.FAILED
    delivery.next_attempt_at = None
    delivery.last_error = error


def _claim(
    sessions: sessionmaker[Session], *, hmac_key: bytes, lease: dt.timedelta, now: dt.datetime
) -> _Claim | None:
    """Take the most overdue delivery and move its next attempt a lease ahead; None if none."""
    with transaction(sessions) as session:
        while True:
            delivery = session.scalars(
                select(WebhookDelivery)
                .where(
                    WebhookDelivery.status == DeliveryStatus.PENDING,
                    WebhookDelivery.next_attempt_at <= now,
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(1)
                .with_for_update(skip_locked=True, of=WebhookDelivery)
            ).first()
            if delivery is None:
                return None
            endpoint = get_endpoint(session, delivery.endpoint_id)
            if endpoint.disabled_at is not None:
                _give_up(delivery, "endpoint disabled")
                session.flush()
                continue
            delivery.attempts += 1
            delivery.next_attempt_at = now + lease
            event = delivery.event
            body = {
                "type": event.type,
                "timestamp": rfc3339(event.created_at),
                "data": event.payload,
            }
            return _Claim(
                delivery.id,
                delivery.attempts,
                endpoint.url,
                endpoint_secret(endpoint, hmac_key=hmac_key),
                event.message_id,
                json.dumps(body, separators=(",", ":")),
            )


def _send(http: requests.Session, claim: _Claim, *, timeout: float, now: dt.datetime) -> _Outcome:
    """POST the signed event once; never raises for what the receiver or network does."""
    headers = {
        "content-type": "application/json",
        "user-agent": "billing-webhooks/1",
        "webhook-id": claim.message_id,
        "webhook-timestamp": str(math.floor(now.timestamp())),
        "webhook-signature": Webhook(claim.secret).sign(claim.message_id, now, claim.body),
    }
    started = time.monotonic()
    status_code, error = None, None
    try:
        # A redirect is a failure (Standard Webhooks): the registered URL is the one we trust.
        with http.post(
            claim.url,
            data=claim.body.encode(),
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        ) as response:
            status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    duration_ms = round((time.monotonic() - started) * 1000)
    return _Outcome(now, status_code, error, duration_ms)


def _record(
    sessions: sessionmaker[Session],
    claim: _Claim,
    outcome: _Outcome,
    *,
    schedule: Sequence[float],
    now: dt.datetime,
) -> None:
    """Log the attempt and settle the delivery: succeeded, retried later, or failed."""
    with transaction(sessions) as session:
        session.add(
            WebhookAttempt(
                delivery_id=claim.delivery_id,
                attempted_at=outcome.attempted_at,
                status_code=outcome.status_code,
                error=outcome.error,
                duration_ms=outcome.duration_ms,
            )
        )
        delivery = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.id == claim.delivery_id)
            .with_for_update(of=WebhookDelivery)
        ).one()
        if delivery.status != DeliveryStatus.PENDING or delivery.attempts != claim.attempt:
            return  # the lease ran out and another worker took the delivery over
        delivery.last_status_code = outcome.status_code
        delivery.last_error = outcome.error
        if outcome.succeeded:
            delivery.status = DeliveryStatus.SUCCEEDED
            delivery.next_attempt_at = None
            delivery.delivered_at = now
        elif claim.attempt <= len(schedule):
            delivery.next_attempt_at = now + dt.timedelta(seconds=schedule[claim.attempt - 1])
        else:
            _give_up(delivery, outcome.error or "failed")


def deliver_due(
    sessions: sessionmaker[Session],
    *,
    hmac_key: bytes,
    schedule: Sequence[float] = RETRY_SCHEDULE,
    timeout: float = DEFAULT_TIMEOUT,
    clock: Callable[[], dt.datetime] = utcnow,
    limit: int = 50,
) -> int:
    """Send due deliveries, one at a time, until none is due or ``limit`` were tried.

    Each is claimed, signed and posted, and its attempt recorded, in transactions of their own
    (``sessions`` makes them). Returns the number of attempts made.
    """
    lease = dt.timedelta(seconds=timeout) * 2 + LEASE_MARGIN
    made = 0
    with requests.Session() as http:
        while made < limit:
            claim = _claim(sessions, hmac_key=hmac_key, lease=lease, now=clock())
            if claim is None:
                break
            outcome = _send(http, claim, timeout=timeout, now=clock())
            if outcome.error:
                log.info(
                    "webhook %s to %s: attempt %d failed: %s",
                    claim.message_id,
                    claim.url,
                    claim.attempt,
                    outcome.error,
                )
            _record(sessions, claim, outcome, schedule=schedule, now=clock())
            made += 1
    return made
