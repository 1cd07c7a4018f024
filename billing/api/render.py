"""Domain objects to response bodies."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

from flask import Response

from billing.access.audit import AuditEntry
from billing.access.auth import ServiceToken
from billing.accounts.accounts import Account
from billing.accounts.key_states import ENFORCEMENT, KeyState
from billing.accounts.keys import ApiKey, KeyStateChange
from billing.accounts.violations import Reported, Violation
from billing.api import schemas
from billing.catalog.catalog import ModelListing
from billing.catalog.pricing import breakdown_usd
from billing.core.money import format_usd
from billing.ledger.ledger import LedgerEntry
from billing.metering.settlement import UnpricedModel
from billing.metering.usage_events import UsageEvent
from billing.notify.models import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    message_id,
)


def account(row: Account, *, held_nanos: int) -> schemas.AccountOut:
    """An account; ``held_nanos`` counts its open holds wherever they are (Runtime.held_nanos)."""
    return schemas.AccountOut(
        id=row.id,
        name=row.name,
        email=row.email,
        balance_usd=format_usd(row.balance_nanos),
        held_usd=format_usd(held_nanos),
        available_usd=format_usd(row.balance_nanos - held_nanos),
        created_at=row.created_at,
    )


def key(row: ApiKey, *, now: dt.datetime) -> schemas.KeyOut:
    state = row.state_at(now)
    return schemas.KeyOut(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        masked_key=row.masked,
        state=state,
        http_status=ENFORCEMENT[state].http_status,
        rate_limit=row.rate_limit,
        monthly_cap_usd=None
        if row.monthly_cap_nanos is None
        else format_usd(row.monthly_cap_nanos),
        allowed_models=row.allowed_models,
        expires_at=row.expires_at,
        created_at=row.created_at,
    )


def key_with_secret(row: ApiKey, secret: str, *, now: dt.datetime) -> schemas.KeyWithSecret:
    return schemas.KeyWithSecret(**key(row, now=now).model_dump(), key=secret)


def ledger_entry(row: LedgerEntry) -> schemas.LedgerEntryOut:
    return schemas.LedgerEntryOut(
        id=row.id,
        account_id=row.account_id,
        kind=row.kind,
        amount_usd=format_usd(row.amount_nanos),
        reason=row.reason,
        reference=row.reference,
        actor=row.actor,
        created_at=row.created_at,
    )


def model(listing: ModelListing) -> schemas.ModelOut:
    version = listing.current
    pricing = None
    if version is not None:
        price = version.price
        pricing = schemas.PricingOut(
            version_id=version.id,
            effective_from=version.effective_from,
            input_price_per_m=format_usd(price.input_nanos_per_m),
            output_price_per_m=format_usd(price.output_nanos_per_m),
            cached_input_price_per_m=format_usd(price.cached_input),
            reasoning_price_per_m=format_usd(price.reasoning),
            max_output_tokens=version.max_output_tokens,
        )
    return schemas.ModelOut(
        id=listing.model.id,
        created=int(listing.model.created_at.timestamp()),
        owned_by="system",
        aliases=listing.aliases,
        pricing=pricing,
    )


def audit_entry(row: AuditEntry) -> schemas.AuditEntryOut:
    return schemas.AuditEntryOut(
        id=row.id,
        actor=row.actor,
        action=row.action,
        target_id=row.target_id,
        status=row.status,
        request=row.request,
        created_at=row.created_at,
    )


def token(row: ServiceToken) -> schemas.TokenOut:
    return schemas.TokenOut(
        id=row.id,
        name=row.name,
        masked_token=f"{row.display_prefix}...{row.last4}",
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def token_with_secret(row: ServiceToken, secret: str) -> schemas.TokenWithSecret:
    return schemas.TokenWithSecret(**token(row).model_dump(), token=secret)


def usage_row(row: dict[str, Any]) -> schemas.UsageRow:
    return schemas.UsageRow(
        **{k: v for k, v in row.items() if k != "cost_nanos"},
        cost_usd=format_usd(row["cost_nanos"]),
    )


def usage_csv(group_by: tuple[str, ...], rows: list[schemas.UsageRow]) -> Response:
    """The usage report as a CSV download, one column per group then the totals."""
    columns = [
        *group_by,
        "requests",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_usd",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        values = row.model_dump(mode="json")
        writer.writerow([values[column] for column in columns])
    return Response(
        buffer.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
    )


def unpriced(row: UnpricedModel) -> schemas.UnpricedModelOut:
    return schemas.UnpricedModelOut(
        model=row.model,
        events=row.events,
        first_occurred_at=row.first_occurred_at,
        last_occurred_at=row.last_occurred_at,
    )


def usage_event(row: UsageEvent) -> schemas.UsageEventOut:
    parts = row.cost_breakdown
    return schemas.UsageEventOut(
        request_id=row.request_id,
        account_id=row.account_id,
        key_id=row.key_id,
        model=row.model,
        model_id=row.model_id,
        status=row.status,
        outcome=row.outcome,
        input_tokens=row.input_tokens,
        cached_tokens=row.cached_tokens,
        output_tokens=row.output_tokens,
        reasoning_tokens=row.reasoning_tokens,
        occurred_at=row.occurred_at,
        received_at=row.received_at,
        settled_at=row.settled_at,
        price_version_id=row.price_version_id,
        cost_usd=None if row.cost_nanos is None else format_usd(row.cost_nanos),
        breakdown=None if parts is None else breakdown_usd(parts),
        ledger_entry_id=row.ledger_entry_id,
    )


# Webhooks


def webhook_endpoint(row: WebhookEndpoint) -> schemas.WebhookEndpointOut:
    return schemas.WebhookEndpointOut(
        id=row.id,
        url=row.url,
        event_types=row.event_types,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


def webhook_endpoint_with_secret(
    row: WebhookEndpoint, secret: str
) -> schemas.WebhookEndpointWithSecret:
    return schemas.WebhookEndpointWithSecret(**webhook_endpoint(row).model_dump(), secret=secret)


def webhook_delivery(row: WebhookDelivery) -> schemas.WebhookDeliveryOut:
    return schemas.WebhookDeliveryOut(
        id=row.id,
        event_id=message_id(row.event_id),
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
) -> schemas.WebhookDeliveryDetail:
    event = row.event
    return schemas.WebhookDeliveryDetail(
        **webhook_delivery(row).model_dump(),
        event=schemas.WebhookEventOut(
            id=message_id(event.id),
            type=event.type,
            data=event.payload,
            created_at=event.created_at,
        ),
        attempt_log=[
            schemas.WebhookAttemptOut(
                id=attempt.id,
                attempted_at=attempt.attempted_at,
                status_code=attempt.status_code,
                error=attempt.error,
                duration_ms=attempt.duration_ms,
            )
            for attempt in attempts
        ],
    )


def key_state_change(row: KeyStateChange, account_id: str) -> schemas.KeyStateChangeOut:
    return schemas.KeyStateChangeOut(
        id=row.id,
        key_id=row.key_id,
        account_id=account_id,
        old_state=row.old_state,
        new_state=row.new_state,
        http_status=ENFORCEMENT[KeyState(row.new_state)].http_status,
        reason=row.reason,
        changed_at=row.created_at,
    )


def violation_reported(result: Reported, *, now: dt.datetime) -> schemas.ViolationReported:
    return schemas.ViolationReported(
        id=result.violation.id,
        key_id=result.key.id,
        state=result.key.state_at(now),
        suspended=result.key.suspended_at is not None,
        duplicate=result.duplicate,
    )


def violation(row: Violation) -> schemas.ViolationOut:
    return schemas.ViolationOut(
        id=row.id,
        key_id=row.key_id,
        account_id=row.account_id,
        request_id=row.request_id,
        category=row.category,
        detail=row.detail,
        reported_at=row.reported_at,
        cleared_at=row.cleared_at,
    )
