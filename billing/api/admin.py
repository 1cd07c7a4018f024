"""The admin API (``/admin/v1``): operators manage accounts, keys, prices and money.

Every route requires an admin bearer token (checked before anything else), and every write that
succeeds is recorded in the audit log in the same transaction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flask import Response, g, request
from flask_openapi3 import APIBlueprint, Tag

from billing.access import audit, auth
from billing.access.auth import Role, authenticate
from billing.accounts import accounts, keys, rollups, violations
from billing.api import render, schemas
from billing.api.context import bearer_token, held, now, session, settings
from billing.catalog import catalog
from billing.core.errors import InvalidRequest
from billing.core.money import format_usd, parse_usd
from billing.ledger import ledger
from billing.metering import settlement, usage_events
from billing.notify import delivery, endpoints
from billing.notify.models import DeliveryStatus
from billing.payments import auto_recharge
from billing.payments.models import AutoRecharge
from billing.runtime import current_runtime

SECURITY: list[dict[str, list[str]]] = [{"admin": []}]
ERRORS: dict[int | str, Any] = {400: schemas.ErrorOut, 401: schemas.ErrorOut, 404: schemas.ErrorOut}

admin = APIBlueprint(
    "admin", __name__, url_prefix="/admin/v1", abp_security=SECURITY, abp_responses=ERRORS
)
ACCOUNTS = [Tag(name="Accounts")]
KEYS = [Tag(name="Keys")]
LEDGER = [Tag(name="Ledger")]
MODELS = [Tag(name="Models and prices")]
AUDIT = [Tag(name="Audit")]
GATEWAY = [Tag(name="Gateway tokens")]
USAGE = [Tag(name="Usage")]
WEBHOOKS = [Tag(name="Webhooks")]


@admin.before_request
def _authenticate() -> None:
    config = settings()
    bootstrap = (
        config.billing_admin_token.get_secret_value() if config.billing_admin_token else None
    )
    g.actor = authenticate(
        session(), bearer_token(), role=Role.ADMIN, bootstrap=bootstrap, hmac_key=config.hmac_key
    )


@admin.after_request
def _audit(response: Response) -> Response:
    if request.method != "GET" and response.status_code < 400 and "actor" in g:
        body = response.get_json(silent=True) or {}
        target = body.get("id") or next(iter((request.view_args or {}).values()), None)
        audit.record(
            session(),
            actor=g.actor,
            action=f"{request.method} {rule.rule if (rule := request.url_rule) else request.path}",
            target_id=str(target) if target is not None else None,
            status=response.status_code,
            request=request.get_json(silent=True),
            now=now(),
        )
    return response


def _all(items: list[Any]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [item.model_dump(mode="json") for item in items],
        "next_cursor": None,
    }


def _page(items: list[Any], limit: int, position: Any) -> dict[str, Any]:
    cursor = schemas.encode_cursor(position(items[-1])) if len(items) == limit else None
    return {
        "object": "list",
        "data": [item.model_dump(mode="json") for item in items],
        "next_cursor": cursor,
    }


# Accounts


@admin.post("/accounts", tags=ACCOUNTS, responses={201: schemas.AccountOut})
def create_account(body: schemas.AccountCreate) -> tuple[dict[str, Any], int]:
    """Open an account with a zero balance."""
    row = accounts.create_account(session(), name=body.name, email=body.email, now=now())
    return render.account(row, held_nanos=0).model_dump(mode="json"), 201


@admin.get("/accounts", tags=ACCOUNTS, responses={200: schemas.Page[schemas.AccountOut]})
def list_accounts(query: schemas.PageQuery) -> dict[str, Any]:
    """Accounts, oldest first."""
    rows = accounts.list_accounts(
        session(), after=schemas.decode_cursor(query.cursor), limit=query.limit
    )
    return _page(
        [render.account(row, held_nanos=held(row)) for row in rows],
        query.limit,
        lambda item: item.id,
    )


@admin.get("/accounts/<account_id>", tags=ACCOUNTS, responses={200: schemas.AccountOut})
def get_account(path: schemas.AccountPath) -> dict[str, Any]:
    """An account with its balance, held and available amounts."""
    row = accounts.get_account(session(), path.account_id)
    return render.account(row, held_nanos=held(row)).model_dump(mode="json")


# Keys


def _cap(body: schemas.KeyFields) -> int | None:
    return None if body.monthly_cap_usd is None else parse_usd(body.monthly_cap_usd)


@admin.post("/accounts/<account_id>/keys", tags=KEYS, responses={201: schemas.KeyWithSecret})
def create_key(path: schemas.AccountPath, body: schemas.KeyCreate) -> tuple[dict[str, Any], int]:
    """Issue a key. The secret `key` is in this response only."""
    rate_limit = (
        body.rate_limit if "rate_limit" in body.model_fields_set else settings().default_rate_limit
    )
    config = keys.KeySettings(
        name=body.name,
        rate_limit=rate_limit,
        monthly_cap_nanos=_cap(body),
        allowed_models=body.allowed_models,
        expires_at=body.expires_at,
    )
    at = now()
    row, secret = keys.issue_key(
        session(), account_id=path.account_id, settings=config, hmac_key=settings().hmac_key, now=at
    )
    return render.key_with_secret(row, secret, now=at).model_dump(mode="json"), 201


@admin.get("/accounts/<account_id>/keys", tags=KEYS, responses={200: schemas.Page[schemas.KeyOut]})
def list_keys(path: schemas.AccountPath) -> dict[str, Any]:
    """The keys of an account (secrets masked)."""
    at = now()
    return _all([render.key(row, now=at) for row in keys.list_keys(session(), path.account_id)])


@admin.get("/keys/<key_id>", tags=KEYS, responses={200: schemas.KeyOut})
def get_key(path: schemas.KeyPath) -> dict[str, Any]:
    """A key with its state and the HTTP status the gateway answers for it."""
    return render.key(keys.get_key(session(), path.key_id), now=now()).model_dump(mode="json")


@admin.patch("/keys/<key_id>", tags=KEYS, responses={200: schemas.KeyOut})
def update_key(path: schemas.KeyPath, body: schemas.KeyUpdate) -> dict[str, Any]:
    """Change a key's settings; fields left out keep their value. `disabled` turns it off or on."""
    row = keys.get_key(session(), path.key_id)
    given = body.model_fields_set
    current = keys.KeySettings(
        name=row.name,
        rate_limit=row.rate_limit,
        monthly_cap_nanos=row.monthly_cap_nanos,
        allowed_models=row.allowed_models,
        expires_at=row.expires_at,
    )
    if "name" in given and body.name is None:
        raise InvalidRequest("name must not be null.", param="name")
    changes: dict[str, Any] = {
        field: getattr(body, field)
        for field in ("name", "rate_limit", "allowed_models", "expires_at")
        if field in given
    }
    if "monthly_cap_usd" in given:
        changes["monthly_cap_nanos"] = _cap(body)
    at = now()
    row = keys.update_key(
        session(),
        path.key_id,
        settings=dataclasses.replace(current, **changes),
        disabled=body.disabled,
        now=at,
    )
    return render.key(row, now=at).model_dump(mode="json")


@admin.post("/keys/<key_id>/revoke", tags=KEYS, responses={200: schemas.KeyOut})
def revoke_key(path: schemas.KeyPath) -> dict[str, Any]:
    """Revoke a key for good (401 from now on)."""
    at = now()
    return render.key(keys.revoke_key(session(), path.key_id, now=at), now=at).model_dump(
        mode="json"
    )


@admin.post("/keys/<key_id>/rotate", tags=KEYS, responses={200: schemas.KeyWithSecret})
def rotate_key(path: schemas.KeyPath) -> dict[str, Any]:
    """Replace a key's secret; the old secret stops working at once. The new `key` is shown once."""
    at = now()
    row, secret = keys.rotate_key(session(), path.key_id, hmac_key=settings().hmac_key, now=at)
    return render.key_with_secret(row, secret, now=at).model_dump(mode="json")


@admin.post("/keys/<key_id>/unsuspend", tags=KEYS, responses={200: schemas.KeyOut})
def unsuspend_key(path: schemas.KeyPath) -> dict[str, Any]:
    """Lift a suspension for content violations and clear the key's violations; the key takes
    the state its other facts call for (e.g. 402 if the account is empty)."""
    at = now()
    row = violations.clear(session(), path.key_id, now=at)
    return render.key(row, now=at).model_dump(mode="json")


@admin.get(
    "/keys/<key_id>/violations", tags=KEYS, responses={200: schemas.Page[schemas.ViolationOut]}
)
def list_violations(path: schemas.KeyPath, query: schemas.PageQuery) -> dict[str, Any]:
    """A key's reported violations, newest first, cleared ones included."""
    rows = violations.list_violations(
        session(),
        path.key_id,
        before=schemas.decode_int_cursor(query.cursor),
        limit=query.limit,
    )
    return _page([render.violation(row) for row in rows], query.limit, lambda item: item.id)


# Ledger


@admin.post(
    "/accounts/<account_id>/adjustments",
    tags=LEDGER,
    responses={201: schemas.LedgerEntryOut, 200: schemas.LedgerEntryOut, 409: schemas.ErrorOut},
)
def create_adjustment(
    path: schemas.AccountPath, header: schemas.IdempotencyHeader, body: schemas.AdjustmentCreate
) -> tuple[dict[str, Any], int]:
    """Credit (positive) or debit (negative) an account, with a reason.

    Requires an `Idempotency-Key`: a retry with the same key and body answers the original entry
    (200) without moving money again; the same key with a different body answers 409.
    """
    entry, created = ledger.post(
        session(),
        ledger.Posting(
            account_id=path.account_id,
            kind=ledger.EntryKind.ADJUSTMENT,
            amount_nanos=parse_usd(body.amount_usd),
            reason=body.reason,
            actor=g.actor,
            idempotency_key=f"adjustment:{path.account_id}:{header.idempotency_key}",
        ),
        now=now(),
    )
    return render.ledger_entry(entry).model_dump(mode="json"), 201 if created else 200


@admin.get(
    "/accounts/<account_id>/ledger",
    tags=LEDGER,
    responses={200: schemas.Page[schemas.LedgerEntryOut]},
)
def list_ledger(path: schemas.AccountPath, query: schemas.PageQuery) -> dict[str, Any]:
    """An account's ledger entries, newest first."""
    rows = ledger.entries(
        session(),
        path.account_id,
        before=schemas.decode_int_cursor(query.cursor),
        limit=query.limit,
    )
    return _page([render.ledger_entry(row) for row in rows], query.limit, lambda item: item.id)


# Models and prices


@admin.post("/models", tags=MODELS, responses={201: schemas.ModelOut, 409: schemas.ErrorOut})
def create_price_version(body: schemas.PriceVersionCreate) -> tuple[dict[str, Any], int]:
    """Add a price version of a model (creating the model on first use)."""
    at = now()
    db = session()
    catalog.add_price_version(
        db,
        model_id=body.id,
        prices=catalog.PriceInput(
            input_price_per_m=body.input_price_per_m,
            output_price_per_m=body.output_price_per_m,
            cached_input_price_per_m=body.cached_input_price_per_m,
            reasoning_price_per_m=body.reasoning_price_per_m,
            max_output_tokens=body.max_output_tokens,
        ),
        effective_from=body.effective_from,
        now=at,
    )
    return render.model(catalog.get_listing(db, body.id, now=at)).model_dump(mode="json"), 201


@admin.get("/models", tags=MODELS, responses={200: schemas.ModelList})
def list_models() -> dict[str, Any]:
    """Every model, priced or not, with the price in effect now."""
    listings = catalog.list_models(session(), now=now(), priced_only=False)
    return {
        "object": "list",
        "data": [render.model(item).model_dump(mode="json") for item in listings],
    }


@admin.post(
    "/models/<model_id>/aliases",
    tags=MODELS,
    responses={201: schemas.AliasOut, 409: schemas.ErrorOut},
)
def create_alias(path: schemas.ModelPath, body: schemas.AliasCreate) -> tuple[dict[str, Any], int]:
    """Make `alias` another name of the model."""
    row = catalog.add_alias(session(), model_id=path.model_id, alias=body.alias, now=now())
    return schemas.AliasOut(alias=row.alias, model_id=row.model_id).model_dump(mode="json"), 201


# Gateway tokens


@admin.post("/gateway-tokens", tags=GATEWAY, responses={201: schemas.TokenWithSecret})
def create_gateway_token(body: schemas.TokenCreate) -> tuple[dict[str, Any], int]:
    """Create a token for a gateway. The secret `token` is in this response only."""
    row, secret = auth.create_token(
        session(), role=Role.GATEWAY, name=body.name, hmac_key=settings().hmac_key, now=now()
    )
    return render.token_with_secret(row, secret).model_dump(mode="json"), 201


@admin.get("/gateway-tokens", tags=GATEWAY, responses={200: schemas.Page[schemas.TokenOut]})
def list_gateway_tokens() -> dict[str, Any]:
    """Every gateway token (masked), revoked ones included."""
    return _all([render.token(row) for row in auth.list_tokens(session(), role=Role.GATEWAY)])


@admin.post("/gateway-tokens/<token_id>/revoke", tags=GATEWAY, responses={200: schemas.TokenOut})
def revoke_gateway_token(path: schemas.TokenPath) -> dict[str, Any]:
    """Revoke a gateway token; it is refused from now on (by other API processes, which
    remember accepted tokens briefly, within 10 seconds)."""
    row = auth.revoke_token(session(), path.token_id, role=Role.GATEWAY, now=now())
    current_runtime().gateway_actors.clear()
    return render.token(row).model_dump(mode="json")


# Usage


@admin.get("/usage", tags=USAGE, responses={200: schemas.UsageReportOut})
def usage_report(query: schemas.UsageQueryIn) -> dict[str, Any] | Response:
    """Settled usage totals with filters, grouped by day, model, key and/or account.

    `format=csv` answers the same rows as CSV.
    """
    group_by = tuple(part.strip() for part in query.group_by.split(",") if part.strip())
    rows = rollups.report(
        session(),
        rollups.UsageQuery(
            account_id=query.account_id,
            key_id=query.key_id,
            model=query.model,
            start=query.start,
            end=query.end,
            group_by=group_by,
        ),
    )
    data = [render.usage_row(row) for row in rows]
    if query.format == "csv":
        return render.usage_csv(group_by, data)
    return {
        "object": "list",
        "group_by": list(group_by),
        "data": [row.model_dump(mode="json", exclude_none=True) for row in data],
    }


@admin.get("/usage/unpriced", tags=USAGE, responses={200: schemas.UnpricedList})
def unpriced_usage() -> dict[str, Any]:
    """Model names with usage parked for want of a price; adding a price settles it."""
    rows = settlement.unpriced_models(session())
    return {
        "object": "list",
        "data": [render.unpriced(row).model_dump(mode="json") for row in rows],
    }


@admin.get("/usage/events/<request_id>", tags=USAGE, responses={200: schemas.UsageEventOut})
def get_usage_event(path: schemas.UsageEventPath) -> dict[str, Any]:
    """One reported event: its tokens, status, and once settled its price and exact breakdown."""
    row = usage_events.get_event(session(), path.request_id)
    return render.usage_event(row).model_dump(mode="json")


# Audit


@admin.get("/audit-log", tags=AUDIT, responses={200: schemas.Page[schemas.AuditEntryOut]})
def list_audit_log(query: schemas.PageQuery) -> dict[str, Any]:
    """Every admin write, newest first."""
    rows = audit.entries(
        session(), before=schemas.decode_int_cursor(query.cursor), limit=query.limit
    )
    return _page([render.audit_entry(row) for row in rows], query.limit, lambda item: item.id)


# Webhooks


@admin.post("/webhook-endpoints", tags=WEBHOOKS, responses={201: schemas.WebhookEndpointWithSecret})
def create_webhook_endpoint(body: schemas.WebhookEndpointCreate) -> tuple[dict[str, Any], int]:
    """Register a gateway endpoint for signed events. The `secret` is in this response only."""
    row, secret = endpoints.create_endpoint(
        session(),
        url=body.url,
        event_types=body.event_types,
        hmac_key=settings().hmac_key,
        now=now(),
    )
    return render.webhook_endpoint_with_secret(row, secret).model_dump(mode="json"), 201


@admin.get(
    "/webhook-endpoints",
    tags=WEBHOOKS,
    responses={200: schemas.Page[schemas.WebhookEndpointOut]},
)
def list_webhook_endpoints() -> dict[str, Any]:
    """Every webhook endpoint, disabled ones included (secrets are never shown again)."""
    return _all([render.webhook_endpoint(row) for row in endpoints.list_endpoints(session())])


@admin.post(
    "/webhook-endpoints/<endpoint_id>/disable",
    tags=WEBHOOKS,
    responses={200: schemas.WebhookEndpointOut},
)
def disable_webhook_endpoint(path: schemas.WebhookEndpointPath) -> dict[str, Any]:
    """Stop sending to an endpoint; its pending deliveries are marked failed."""
    row = endpoints.disable_endpoint(session(), path.endpoint_id, now=now())
    return render.webhook_endpoint(row).model_dump(mode="json")


@admin.get(
    "/webhook-endpoints/<endpoint_id>/deliveries",
    tags=WEBHOOKS,
    responses={200: schemas.Page[schemas.WebhookDeliveryOut]},
)
def list_webhook_deliveries(
    path: schemas.WebhookEndpointPath, query: schemas.WebhookDeliveryQuery
) -> dict[str, Any]:
    """An endpoint's deliveries, newest first, optionally only those with `status`."""
    rows = delivery.deliveries(
        session(),
        path.endpoint_id,
        status=None if query.status is None else DeliveryStatus(query.status),
        before=schemas.decode_int_cursor(query.cursor),
        limit=query.limit,
    )
    return _page([render.webhook_delivery(row) for row in rows], query.limit, lambda item: item.id)


@admin.get(
    "/webhook-deliveries/<delivery_id>",
    tags=WEBHOOKS,
    responses={200: schemas.WebhookDeliveryDetail},
)
def get_webhook_delivery(path: schemas.WebhookDeliveryPath) -> dict[str, Any]:
    """A delivery with its event and every attempt (status code or error, and duration)."""
    db = session()
    row = delivery.get_delivery(db, path.delivery_id)
    detail = render.webhook_delivery_detail(row, delivery.attempts(db, row.id))
    return detail.model_dump(mode="json")


@admin.post(
    "/webhook-deliveries/<delivery_id>/replay",
    tags=WEBHOOKS,
    responses={201: schemas.WebhookDeliveryOut, 409: schemas.ErrorOut},
)
def replay_webhook_delivery(path: schemas.WebhookDeliveryPath) -> tuple[dict[str, Any], int]:
    """Send a delivery's event again, as a new delivery with the same `webhook-id`."""
    row = delivery.replay(session(), path.delivery_id, now=now())
    return render.webhook_delivery(row).model_dump(mode="json"), 201


# Auto-recharge (billing.payments.auto_recharge)

AUTO_RECHARGE = [Tag(name="Auto-recharge")]


def _auto_recharge(row: AutoRecharge) -> dict[str, Any]:
    return schemas.AutoRechargeOut(
        account_id=row.account_id,
        enabled=row.enabled,
        threshold_usd=format_usd(row.threshold_nanos),
        amount_usd=format_usd(row.amount_nanos),
        daily_cap_usd=format_usd(row.daily_cap_nanos),
        payment_method_id=row.payment_method_id,
        consecutive_failures=row.consecutive_failures,
        retry_after=row.retry_after,
        last_failure=row.last_failure,
    ).model_dump(mode="json")


@admin.put(
    "/accounts/<account_id>/auto-recharge",
    tags=AUTO_RECHARGE,
    responses={200: schemas.AutoRechargeOut, 502: schemas.ErrorOut},
)
def set_auto_recharge(path: schemas.AccountPath, body: schemas.AutoRechargeIn) -> dict[str, Any]:
    """Set the account's auto-recharge: when its available balance falls below `threshold_usd`,
    charge `amount_usd` to the saved card `payment_method_id`, at most `daily_cap_usd` a day."""
    row = auto_recharge.configure_auto_recharge(
        session(),
        account_id=path.account_id,
        enabled=body.enabled,
        threshold_nanos=parse_usd(body.threshold_usd),
        amount_nanos=parse_usd(body.amount_usd),
        daily_cap_nanos=None if body.daily_cap_usd is None else parse_usd(body.daily_cap_usd),
        payment_method_id=body.payment_method_id,
        settings=settings(),
        now=now(),
    )
    return _auto_recharge(row)


@admin.get(
    "/accounts/<account_id>/auto-recharge",
    tags=AUTO_RECHARGE,
    responses={200: schemas.AutoRechargeOut},
)
def get_auto_recharge(path: schemas.AccountPath) -> dict[str, Any]:
    """The account's auto-recharge settings; 404 if none were set."""
    row = auto_recharge.get_auto_recharge(session(), path.account_id)
    if row is None:
        raise auto_recharge.AutoRechargeNotSet(
            f"Account {path.account_id} has no auto-recharge.", param="account_id"
        )
    return _auto_recharge(row)
