"""Operator endpoints without credentials: health and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import current_app, redirect
from flask_openapi3 import APIBlueprint, OpenAPI, Tag
from flask_openapi3.models import Schema
from pydantic import BaseModel
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


def register_docs(app: OpenAPI, models: Iterable[type[BaseModel]]) -> None:
    """Serve the generated OpenAPI document at ``/openapi.json`` and the docs UI at ``/docs``.

    ``models`` document request bodies that their views parse themselves (item by item).
    """
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            app.components_schemas[name] = Schema(**definition)
        app.components_schemas[model.__name__] = Schema(**schema)

    @app.get("/openapi.json", doc_ui=False)
    def openapi_document() -> dict[str, Any]:
        return current_app.api_doc  # type: ignore[attr-defined,no-any-return]

    @app.get("/", doc_ui=False)
    def index() -> Response:
        return redirect("/docs/swagger")
