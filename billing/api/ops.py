"""Operator endpoints: health, readiness and the OpenAPI document (without credentials), and
the Prometheus metrics (with ``METRICS_TOKEN``)."""

from __future__ import annotations

import datetime as dt
import hmac
import time
from typing import Any, Literal

from flask import Flask, abort, current_app, g, redirect, request
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from pydantic import BaseModel
from sqlalchemy import text
from werkzeug.wrappers import Response

from billing.access.auth import Unauthenticated
from billing.api.schemas import ANY_ROUTE_ERRORS, ErrorOut
from billing.core import metrics
from billing.health import gauges, readiness
from billing.http.context import bearer_token, now, session, settings
from billing.runtime import current_runtime

ops = APIBlueprint("ops", __name__, abp_responses=ANY_ROUTE_ERRORS)
TAGS = [Tag(name="Operations")]


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]


@ops.get("/healthz", tags=TAGS, responses={200: Health})
def healthz() -> dict[str, Any]:
    """Liveness and database reachability."""
    session().execute(text("SELECT 1"))
    return {"status": "ok", "database": "ok"}


class CheckOut(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, CheckOut]


@ops.get("/readyz", tags=TAGS, responses={200: Readiness, 503: ErrorOut})
def readyz() -> dict[str, Any]:
    """Readiness: PostgreSQL answers, migrations are at head, Redis answers (when configured)
    and settlement keeps up; a 503 names each failing check."""
    checks = readiness.require_ready(
        session(),
        redis_client=current_runtime().redis,
        max_settlement_lag=dt.timedelta(seconds=settings().ready_max_settlement_lag_seconds),
        now=now(),
    )
    return {
        "status": "ready",
        "checks": {item.name: {"ok": item.ok, "detail": item.detail} for item in checks},
    }


def register_docs(app: OpenAPI) -> None:
    """Serve the generated OpenAPI document at ``/openapi.json`` and the docs UI at ``/docs``."""

    @app.get("/openapi.json", doc_ui=False)
    def openapi_document() -> dict[str, Any]:
        return current_app.api_doc  # type: ignore[attr-defined,no-any-return]

    @app.get("/", doc_ui=False)
    def index() -> Response:
        return redirect("/docs/swagger")


# Prometheus (billing.core.metrics, billing.health.gauges). Left out of the OpenAPI document, which
# describes the JSON API: this answers in Prometheus's text format, for a scraper, not a client.


@ops.get("/metrics", doc_ui=False)
def prometheus_metrics() -> Response:
    """The metrics of every process sharing ``PROMETHEUS_MULTIPROC_DIR`` and the gauges read now.

    Requires ``Authorization: Bearer <METRICS_TOKEN>``; with no token set (or an empty one) this
    is a 404, as if the route did not exist, so it is never open by accident.
    """
    configured = settings().metrics_token
    expected = configured.get_secret_value() if configured is not None else ""
    if not expected:
        abort(404)
    given = bearer_token() or ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthenticated("A valid metrics token is required (Authorization: Bearer ...).")
    scraped = gauges.scrape(session(), current_runtime().hotpath, now=now())
    return Response(metrics.exposition(scraped), content_type=metrics.CONTENT_TYPE)


def instrument(app: Flask) -> None:
    """Time every request Flask answers, by route (``billing_http_request_duration_seconds``).

    Call before registering the hook that commits, so that the timing includes the commit
    (after-request hooks run in reverse order).
    """
    app.before_request(_start_timer)
    app.after_request(_observe)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    started = g.get("metrics_started")
    if started is not None:
        rule = request.url_rule
        metrics.HTTP_SECONDS.labels(
            method=request.method,
            route=rule.rule if rule is not None else "unmatched",
            status=str(response.status_code),
        ).observe(time.perf_counter() - started)
    return response
