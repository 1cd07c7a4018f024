"""Webhook endpoints: the gateway URLs that receive events, and their signing secrets.

Invariants:
- An endpoint's URL follows the rule of ``billing.notify.addresses`` (http(s), no credentials,
  no private, loopback, link-local or metadata address unless allowed), and it subscribes to at
  least one known event type.
- Endpoint secrets (``whsec_`` + base64 of 32 bytes) are shown once, at creation, and never
  stored: each is derived when needed as HMAC-SHA256(server secret, endpoint id and a random
  salt), so a copy of the database cannot sign events (a forged ``key.state_changed`` could
  reopen blocked keys at the gateway). Changing ``SECRET_KEY`` changes every endpoint's secret.
- A disabled endpoint is sent nothing more: its pending deliveries fail.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.core.errors import InvalidRequest, NotFound
from billing.core.ids import new_id, random_base62
from billing.notify.addresses import checked_url
from billing.notify.models import (
    DeliveryStatus,
    EventType,
    WebhookDelivery,
    WebhookEndpoint,
)

SECRET_PREFIX = "whsec_"  # noqa: S105  # the Standard Webhooks prefix, not a secret


class EndpointNotFound(NotFound):
    """No webhook endpoint has that id."""


def endpoint_secret(endpoint: WebhookEndpoint, *, hmac_key: bytes) -> str:
    """The signing secret of ``endpoint``, derived from the server secret (never stored)."""
    digest = hmac.new(
        hmac_key, f"webhook-endpoint:{endpoint.id}:{endpoint.secret_salt}".encode(), hashlib.sha256
    ).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


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
    return sorted({str(kind) for kind in event_types})


def create_endpoint(
    session: Session,
    *,
    url: str,
    event_types: Sequence[str] | None,
    hmac_key: bytes,
    allow_private: bool,
    now: dt.datetime,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint (default: every event type); returns it with its secret, shown once.

    Raises InvalidRequest for a URL that is not http(s) with a host, or an unknown event type,
    and AddressRefused for a private, loopback, link-local or metadata host unless
    ``allow_private``.
    """
    endpoint = WebhookEndpoint(
        id=new_id("whe"),
        url=checked_url(url, allow_private=allow_private),
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
            delivery.give_up("endpoint disabled")
    return endpoint
