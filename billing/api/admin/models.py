"""Models and prices (``/admin/v1/models``): price versions and aliases."""

from __future__ import annotations

from typing import Any, Literal

from flask_openapi3 import Tag
from pydantic import AwareDatetime, BaseModel, Field, StrictInt

from billing.api import render, schemas
from billing.api.admin.blueprint import admin
from billing.catalog import catalog
from billing.catalog.usage import MAX_TOKENS
from billing.http.context import now, session

TAGS = [Tag(name="Models and prices")]


class PriceVersionCreate(schemas.Body):
    id: str = Field(min_length=1, max_length=128, examples=["doubao-seed-2-0-lite"])
    input_price_per_m: schemas.PriceAmount
    output_price_per_m: schemas.PriceAmount
    cached_input_price_per_m: schemas.PriceAmount | None = Field(
        None, description="Default: input price."
    )
    reasoning_price_per_m: schemas.PriceAmount | None = Field(
        None, description="Default: output price."
    )
    max_output_tokens: StrictInt | None = Field(None, gt=0, le=MAX_TOKENS)
    effective_from: AwareDatetime | None = Field(
        None, description="Default: now. RFC 3339 with a UTC offset."
    )


class ModelPath(BaseModel):
    model_id: str


class AliasCreate(schemas.Body):
    alias: str = Field(min_length=1, max_length=128, examples=["doubao-seed-2.0-lite"])


class AliasOut(BaseModel):
    object: Literal["model_alias"] = "model_alias"
    alias: str
    model_id: str


@admin.post("/models", tags=TAGS, responses={201: schemas.ModelOut, 409: schemas.ErrorOut})
def create_price_version(body: PriceVersionCreate) -> tuple[dict[str, Any], int]:
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


@admin.get("/models", tags=TAGS, responses={200: schemas.ModelList})
def list_models() -> dict[str, Any]:
    """Every model, priced or not, with the price in effect now."""
    listings = catalog.list_models(session(), now=now(), priced_only=False)
    return {
        "object": "list",
        "data": [render.model(item).model_dump(mode="json") for item in listings],
    }


@admin.post(
    "/models/<model_id>/aliases",
    tags=TAGS,
    responses={201: AliasOut, 409: schemas.ErrorOut},
)
def create_alias(path: ModelPath, body: AliasCreate) -> tuple[dict[str, Any], int]:
    """Make `alias` another name of the model."""
    row = catalog.add_alias(session(), model_id=path.model_id, alias=body.alias, now=now())
    return AliasOut(alias=row.alias, model_id=row.model_id).model_dump(mode="json"), 201
