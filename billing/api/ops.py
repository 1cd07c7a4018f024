"""Operator endpoints without credentials: health, readiness and the OpenAPI document."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask import current_app, redirect
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from pydantic import BaseModel
from sqlalchemy import text
from werkzeug.wrappers import Response

from billing.api.schemas import ErrorOut
from billing.health import readiness
from billing.http.context import now, session, settings
from billing.runtime import current_runtime

ops = APIBlueprint("ops", __name__)
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
