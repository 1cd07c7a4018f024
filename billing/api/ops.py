"""Operator endpoints without credentials: health and the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from flask import current_app, redirect
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from pydantic import BaseModel
from sqlalchemy import text
from werkzeug.wrappers import Response

from billing.http.context import session

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


def register_docs(app: OpenAPI) -> None:
    """Serve the generated OpenAPI document at ``/openapi.json`` and the docs UI at ``/docs``."""

    @app.get("/openapi.json", doc_ui=False)
    def openapi_document() -> dict[str, Any]:
        return current_app.api_doc  # type: ignore[attr-defined,no-any-return]

    @app.get("/", doc_ui=False)
    def index() -> Response:
        return redirect("/docs/swagger")
