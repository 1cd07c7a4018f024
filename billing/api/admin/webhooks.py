"""Webhooks (``/admin/v1/webhook-endpoints``, ``/admin/v1/webhook-deliveries``): the gateway's
endpoints for signed events, and every delivery to them."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask_openapi3 import Tag
from pydantic import BaseModel, Field

from billing.api import render, schemas
from billing.api.admin.blueprint import admin
from billing.http.context import now, session, settings
from billing.notify import delivery, endpoints
from billing.notify.models import (
    DeliveryStatus,
    EventType,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)

TAGS = [Tag(name="Webhooks")]


class WebhookEndpointCreate(schemas.Body):
    url: str = Field(
        min_length=1,
        max_length=2000,
        description="An http:// or https:// URL of a public address (no loopback, private,"
        " link-local or metadata host unless WEBHOOK_ALLOW_PRIVATE_URLS); each request to it is"
        " signed (Standard Webhooks).",
        examples=["https://gateway.example.com/billing-webhooks"],
    )
    event_types: list[EventType] | None = Field(
        None, description="The event types to receive; omitted or null: all of them."
    )


class WebhookEndpointOut(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    event_types: list[str]
    created_at: dt.datetime
    disabled_at: dt.datetime | None


class WebhookEndpointWithSecret(WebhookEndpointOut):
    secret: str = Field(
        description="The signing secret (`whsec_...`) for verifying our requests with a Standard"
        " Webhooks library. Shown only in this response; store it now."
    )


class WebhookEndpointPath(BaseModel):
    endpoint_id: str


class WebhookDeliveryOut(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: int
    event_id: str = Field(description="The `webhook-id` header of every attempt.")
    event_type: str
    endpoint_id: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: dt.datetime | None
    replay_of: int | None = Field(description="The delivery this one replays, if any.")
    created_at: dt.datetime


class WebhookAttemptOut(BaseModel):
    object: Literal["webhook_attempt"] = "webhook_attempt"
    id: int
    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class WebhookEventOut(BaseModel):
    object: Literal["webhook_event"] = "webhook_event"
    id: str
    type: str
    data: dict[str, Any]
    created_at: dt.datetime


class WebhookDeliveryDetail(WebhookDeliveryOut):
    event: WebhookEventOut
    attempt_log: list[WebhookAttemptOut] = Field(description="Every attempt, oldest first.")


class WebhookDeliveryPath(BaseModel):
    delivery_id: int


class WebhookDeliveryQuery(schemas.PageQuery):
    status: Literal["pending", "succeeded", "failed"] | None = None


def webhook_endpoint(row: WebhookEndpoint) -> WebhookEndpointOut:
    return WebhookEndpointOut(
        id=row.id,
        url=row.url,
        event_types=row.event_types,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


def webhook_endpoint_with_secret(row: WebhookEndpoint, secret: str) -> WebhookEndpointWithSecret:
    return WebhookEndpointWithSecret(**webhook_endpoint(row).model_dump(), secret=secret)


def webhook_delivery(row: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        id=row.id,
        event_id=row.event.message_id,
        event_type=row.event.type,
        endpoint_id=row.endpoint_id,
        status=row.status,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        delivered_at=row.delivered_at,
        replay_of=row.replay_of,
        created_at=row.created_at,
    )


def webhook_delivery_detail(
    row: WebhookDelivery, attempts: list[WebhookAttempt]
) -> WebhookDeliveryDetail:
    event = row.event
    return WebhookDeliveryDetail(
        **webhook_delivery(row).model_dump(),
        event=WebhookEventOut(
            id=event.message_id,
            type=event.type,
            data=event.payload,
            created_at=event.created_at,
        ),
        attempt_log=[
            WebhookAttemptOut(
                id=attempt.id,
                attempted_at=attempt.attempted_at,
                status_code=attempt.status_code,
                error=attempt.error,
                duration_ms=attempt.duration_ms,
            )
            for attempt in attempts
        ],
    )


@admin.post("/webhook-endpoints", tags=TAGS, responses={201: WebhookEndpointWithSecret})
def create_webhook_endpoint(body: WebhookEndpointCreate) -> tuple[dict[str, Any], int]:
    """Register a gateway endpoint for signed events. The `secret` is in this response only."""
    row, secret = endpoints.create_endpoint(
        session(),
        url=body.url,
        event_types=body.event_types,
        hmac_key=settings().hmac_key,
        allow_private=settings().webhook_allow_private_urls,
        now=now(),
    )
    return webhook_endpoint_with_secret(row, secret).model_dump(mode="json"), 201


@admin.get(
    "/webhook-endpoints",
    tags=TAGS,
    responses={200: schemas.Page[WebhookEndpointOut]},
)
def list_webhook_endpoints() -> dict[str, Any]:
    """Every webhook endpoint, disabled ones included (secrets are never shown again)."""
    return render.single_page(
        [webhook_endpoint(row) for row in endpoints.list_endpoints(session())]
    )


@admin.post(
    "/webhook-endpoints/<endpoint_id>/disable",
    tags=TAGS,
    responses={200: WebhookEndpointOut},
)
def disable_webhook_endpoint(path: WebhookEndpointPath) -> dict[str, Any]:
    """Stop sending to an endpoint; its pending deliveries are marked failed."""
    row = endpoints.disable_endpoint(session(), path.endpoint_id, now=now())
    return webhook_endpoint(row).model_dump(mode="json")


@admin.get(
    "/webhook-endpoints/<endpoint_id>/deliveries",
    tags=TAGS,
    responses={200: schemas.Page[WebhookDeliveryOut]},
)
def list_webhook_deliveries(
    path: WebhookEndpointPath, query: WebhookDeliveryQuery
) -> dict[str, Any]:
    """An endpoint's deliveries, newest first, optionally only those with `status`."""
    rows = delivery.deliveries(
        session(),
        path.endpoint_id,
        status=None if query.status is None else DeliveryStatus(query.status),
        before=schemas.decode_int_cursor(query.cursor),
        limit=query.limit,
    )
    return render.page([webhook_delivery(row) for row in rows], query.limit, lambda item: item.id)


@admin.get(
    "/webhook-deliveries/<delivery_id>",
    tags=TAGS,
    responses={200: WebhookDeliveryDetail},
)
def get_webhook_delivery(path: WebhookDeliveryPath) -> dict[str, Any]:
    """A delivery with its event and every attempt (status code or error, and duration)."""
    db = session()
    row = delivery.get_delivery(db, path.delivery_id)
    detail = webhook_delivery_detail(row, delivery.attempts(db, row.id))
    return detail.model_dump(mode="json")


@admin.post(
    "/webhook-deliveries/<delivery_id>/replay",
    tags=TAGS,
    responses={201: WebhookDeliveryOut, 409: schemas.ErrorOut},
)
def replay_webhook_delivery(path: WebhookDeliveryPath) -> tuple[dict[str, Any], int]:
    """Send a delivery's event again, as a new delivery with the same `webhook-id`."""
    row = delivery.replay(session(), path.delivery_id, now=now())
    return webhook_delivery(row).model_dump(mode="json"), 201
