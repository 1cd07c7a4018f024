"""Domain objects to response bodies."""

from __future__ import annotations

import datetime as dt

from billing.accounts import Account
from billing.api import schemas
from billing.audit import AuditEntry
from billing.catalog import ModelListing
from billing.keys import ENFORCEMENT, ApiKey
from billing.ledger import LedgerEntry
from billing.money import format_usd


def account(row: Account) -> schemas.AccountOut:
    return schemas.AccountOut(
        id=row.id,
        name=row.name,
        email=row.email,
        balance_usd=format_usd(row.balance_nanos),
        held_usd=format_usd(row.held_nanos),
        available_usd=format_usd(row.available_nanos),
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
