"""Webhook delivery: sending queued events, signed, with retries, and replaying them.

Invariants:
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
- Each attempt resolves the endpoint's host once, checks every address against
  ``billing.notify.addresses`` and connects to the checked one; a refused address fails the
  delivery at once (it is a configuration or an attack, not an outage). Redirects are not
  followed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from billing.core.db import MAX_ROW_ID, newest_first, transaction, utcnow
from billing.core.effects import mark_webhooks_pending
from billing.core.errors import Conflict, InvalidRequest, NotFound
from billing.notify import addresses
from billing.notify.endpoints import endpoint_secret, get_endpoint
from billing.notify.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, rfc3339

log = logging.getLogger(__name__)

# Seconds to wait after failed attempt 1, 2, ...; after the last retry the delivery has failed
# (7 attempts over about 7 hours 13 minutes). ``WEBHOOK_RETRY_SCHEDULE`` overrides it.
RETRY_SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 3600, 21600)
# How long one request may take (connect, and each read), in seconds.
DEFAULT_TIMEOUT = 5.0
# A claimed delivery is retried this long after its request's timeout if its worker is gone.
LEASE_MARGIN = dt.timedelta(seconds=30)


class DeliveryNotFound(NotFound):
    """No webhook delivery has that id."""


class EndpointDisabled(Conflict):
    """The endpoint is disabled: nothing is sent to it any more."""

    code = "endpoint_disabled"


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
    in_range = 0 < delivery_id <= MAX_ROW_ID
    delivery = session.get(WebhookDelivery, delivery_id) if in_range else None
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
    endpoint_id: str
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
    final: bool = False  # no retry: the delivery fails now

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


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
                delivery.give_up("endpoint disabled")
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
                endpoint.id,
                endpoint.url,
                endpoint_secret(endpoint, hmac_key=hmac_key),
                event.message_id,
                json.dumps(body, separators=(",", ":")),
            )


def _send(
    http: requests.Session,
    claim: _Claim,
    *,
    timeout: float,
    allow_private: bool,
    now: dt.datetime,
) -> _Outcome:
    """POST the signed event once, to the address its host resolves to if that may be reached;
    never raises for what the receiver, the network or DNS does."""
    started = time.monotonic()
    status_code, error, final = None, None, False
    try:
        destination = addresses.resolve(claim.url, allow_private=allow_private)
    except InvalidRequest as exc:  # AddressRefused, or a URL registered under older rules
        error, final = f"refused: {exc.message}", True
    except (OSError, UnicodeError) as exc:
        error = f"ConnectionError: could not resolve the host: {exc}"
    else:
        status_code, error = _post(http, claim, destination, timeout=timeout, now=now)
    duration_ms = round((time.monotonic() - started) * 1000)
    return _Outcome(now, status_code, error and error[:500], duration_ms, final)


def _post(
    http: requests.Session,
    claim: _Claim,
    destination: addresses.Destination,
    *,
    timeout: float,
    now: dt.datetime,
) -> tuple[int | None, str | None]:
    """The status code and the error (None: a 2xx) of one signed POST to ``destination``."""
    headers = {
        "host": destination.host_header,
        "content-type": "application/json",
        "user-agent": "billing-webhooks/1",
        "webhook-id": claim.message_id,
        "webhook-timestamp": str(math.floor(now.timestamp())),
        "webhook-signature": Webhook(claim.secret).sign(claim.message_id, now, claim.body),
    }
    try:
        # A redirect is a failure (Standard Webhooks): the registered URL is the one we trust.
        with http.post(
            destination.url,
            data=claim.body.encode(),
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        ) as response:
            status_code = response.status_code
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return status_code, None if 200 <= status_code < 300 else f"HTTP {status_code}"


def _record(
    sessions: sessionmaker[Session],
    claim: _Claim,
    outcome: _Outcome,
    *,
    schedule: Sequence[float],
    now: dt.datetime,
) -> str | None:
    """Log the attempt and settle the delivery: succeeded, retried later, or failed; returns
    which (``succeeded``, ``retry_scheduled``, ``failed``), or None if another worker took it."""
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
            return None  # the lease ran out and another worker took the delivery over
        delivery.last_status_code = outcome.status_code
        delivery.last_error = outcome.error
        if outcome.succeeded:
            delivery.status = DeliveryStatus.SUCCEEDED
            delivery.next_attempt_at = None
            delivery.delivered_at = now
            return "succeeded"
        if not outcome.final and claim.attempt <= len(schedule):
            delivery.next_attempt_at = now + dt.timedelta(seconds=schedule[claim.attempt - 1])
            return "retry_scheduled"
        delivery.give_up(outcome.error or "failed")
        return "failed"


def deliver_due(
    sessions: sessionmaker[Session],
    *,
    hmac_key: bytes,
    schedule: Sequence[float] = RETRY_SCHEDULE,
    timeout: float = DEFAULT_TIMEOUT,
    allow_private: bool = False,
    clock: Callable[[], dt.datetime] = utcnow,
    limit: int = 50,
    on_outcome: Callable[[str], None] | None = None,
) -> int:
    """Send due deliveries, one at a time, until none is due or ``limit`` were tried.

    Each is claimed, signed and posted, and its attempt recorded, in transactions of their own
    (``sessions`` makes them); ``on_outcome`` hears each recorded outcome (as ``_record``
    returns it) once committed. Returns the number of attempts made. Private, loopback and
    other non-public addresses are refused unless ``allow_private``.
    """
    lease = dt.timedelta(seconds=timeout) * 2 + LEASE_MARGIN
    made = 0
    with requests.Session() as http:
        http.mount("http://", addresses.PinnedAdapter())
        http.mount("https://", addresses.PinnedAdapter())
        while made < limit:
            claim = _claim(sessions, hmac_key=hmac_key, lease=lease, now=clock())
            if claim is None:
                break
            outcome = _send(http, claim, timeout=timeout, allow_private=allow_private, now=clock())
            if outcome.error:
                # The endpoint, not its URL: a receiver's URL may hold a secret path or query.
                log.info(
                    "webhook %s to endpoint %s: attempt %d failed: %s",
                    claim.message_id,
                    claim.endpoint_id,
                    claim.attempt,
                    outcome.error,
                )
            recorded = _record(sessions, claim, outcome, schedule=schedule, now=clock())
            if recorded is not None and on_outcome is not None:
                on_outcome(recorded)
            made += 1
    return made
