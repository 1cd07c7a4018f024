"""Operator endpoints without credentials: health and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, redirect
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import text
from werkzeug.wrappers import Response

from billing.api import schemas
from billing.api.context import session

ops = APIBlueprint("ops", __name__)
TAGS = [Tag(name="Operations")]


@ops.get("/healthz", tags=TAGS, responses={200: schemas.Health})
def healthz() -> dict[str, Any]:
    """Liveness and database reachability."""
    session().execute(text("SELECT 1"))
    return {"status": "ok", "database": "ok"}


def register_docs(app: Flask) -> None:
    """Serve the generated OpenAPI document at ``/openapi.json`` and the docs UI at ``/docs``."""

    @app.get("/openapi.json")
    def openapi_document() -> dict[str, Any]:
        return current_app.api_doc  # type: ignore[attr-defined,no-any-return]

    @app.get("/")
    def index() -> Response:
        return redirect("/docs/swagger")
