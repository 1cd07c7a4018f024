"""Usage (``/admin/v1/usage``): settled totals, usage parked for want of a price, one event."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any, Literal

from flask import Response
from flask_openapi3 import Tag
from pydantic import BaseModel, Field

from billing.accounts import rollups
from billing.api.admin.blueprint import admin
from billing.api.schemas import ErrorOut
from billing.catalog.pricing import breakdown_usd
from billing.core.money import format_usd
from billing.http.context import report_session, session
from billing.metering import settlement, usage_events
from billing.metering.settlement import UnpricedModel
from billing.metering.usage_events import UsageEvent

TAGS = [Tag(name="Usage")]


class UsageQueryIn(BaseModel):
    account_id: str | None = None
    key_id: str | None = None
    model: str | None = Field(None, description="A model id (after alias resolution).")
    start: dt.date | None = Field(None, alias="from", description="First UTC day, included.")
    end: dt.date | None = Field(None, alias="to", description="Last UTC day, included.")
    group_by: str = Field("day", description="Comma-separated: day, model, key, account.")
    format: Literal["json", "csv"] = "json"


class UsageRow(BaseModel):
    day: dt.date | None = None
    model: str | None = None
    key: str | None = None
    account: str | None = None
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str


class UsageReportOut(BaseModel):
    """The rows as JSON, or with `format=csv` as CSV: one column per group, then the totals."""

    # flask-openapi3 adds this to the answer's documented content, beside the JSON.
    model_config = {  # type: ignore[typeddict-unknown-key]
        "openapi_extra": {"content": {"text/csv": {"schema": {"type": "string"}}}}
    }

    object: Literal["list"] = "list"
    group_by: list[str]
    data: list[UsageRow]


class UnpricedModelOut(BaseModel):
    object: Literal["unpriced_model"] = "unpriced_model"
    model: str
    events: int
    first_occurred_at: dt.datetime
    last_occurred_at: dt.datetime


class UnpricedList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UnpricedModelOut]


class UsageEventPath(BaseModel):
    request_id: str


class UsageEventOut(BaseModel):
    object: Literal["usage_event"] = "usage_event"
    request_id: str
    account_id: str
    key_id: str
    model: str = Field(description="As reported.")
    model_id: str | None = Field(description="The model it resolved to.")
    status: Literal["pending", "settled", "unpriced"]
    outcome: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    occurred_at: dt.datetime
    received_at: dt.datetime
    settled_at: dt.datetime | None
    price_version_id: int | None
    cost_usd: str | None
    breakdown: dict[str, str] | None = Field(
        description="input_usd, cached_usd, output_usd, reasoning_usd (exact) and total_usd."
    )
    ledger_entry_id: int | None


def usage_row(row: dict[str, Any]) -> UsageRow:
    return UsageRow(
        **{k: v for k, v in row.items() if k != "cost_nanos"},
        cost_usd=format_usd(row["cost_nanos"]),
    )


def usage_csv(group_by: tuple[str, ...], rows: list[UsageRow]) -> Response:
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


def unpriced(row: UnpricedModel) -> UnpricedModelOut:
    return UnpricedModelOut(
        model=row.model,
        events=row.events,
        first_occurred_at=row.first_occurred_at,
        last_occurred_at=row.last_occurred_at,
    )


def usage_event(row: UsageEvent) -> UsageEventOut:
    parts = row.cost_breakdown
    return UsageEventOut(
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


@admin.get("/usage", tags=TAGS, responses={200: UsageReportOut, 503: ErrorOut})
def usage_report(query: UsageQueryIn) -> dict[str, Any] | Response:
    """Settled usage totals with filters, grouped by day, model, key and/or account.

    `format=csv` answers the same rows as CSV. Read from the replica when there is one
    (DATABASE_READ_URL): usage settled in the last moments may be missing; a 503 while the
    replica is out of reach.
    """
    group_by = tuple(part.strip() for part in query.group_by.split(",") if part.strip())
    rows = rollups.report(
        report_session(),
        rollups.UsageQuery(
            account_id=query.account_id,
            key_id=query.key_id,
            model=query.model,
            start=query.start,
            end=query.end,
            group_by=group_by,
        ),
    )
    data = [usage_row(row) for row in rows]
    if query.format == "csv":
        return usage_csv(group_by, data)
    return {
        "object": "list",
        "group_by": list(group_by),
        "data": [row.model_dump(mode="json", exclude_none=True) for row in data],
    }


@admin.get("/usage/unpriced", tags=TAGS, responses={200: UnpricedList})
def unpriced_usage() -> dict[str, Any]:
    """Model names with usage parked for want of a price; adding a price settles it."""
    rows = settlement.unpriced_models(session())
    return {
        "object": "list",
        "data": [unpriced(row).model_dump(mode="json") for row in rows],
    }


@admin.get("/usage/events/<request_id>", tags=TAGS, responses={200: UsageEventOut})
def get_usage_event(path: UsageEventPath) -> dict[str, Any]:
    """One reported event: its tokens, status, and once settled its price and exact breakdown."""
    row = usage_events.get_event(session(), path.request_id)
    return usage_event(row).model_dump(mode="json")
