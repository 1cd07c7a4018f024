"""Response builders that several modules share: list pages and the model listing. A builder that
one module uses lives beside its views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from billing.api import schemas
from billing.catalog.catalog import ModelListing
from billing.core.money import format_usd


def single_page(items: list[Any]) -> dict[str, Any]:
    """Every item of a short list as one page (``Page`` with no ``next_cursor``)."""
    return {
        "object": "list",
        "data": [item.model_dump(mode="json") for item in items],
        "next_cursor": None,
    }


def page(items: list[Any], limit: int, position: Callable[[Any], str | int]) -> dict[str, Any]:
    """A ``Page`` of ``items``; a full one has a ``next_cursor`` at its last item's ``position``."""
    cursor = schemas.encode_cursor(position(items[-1])) if len(items) == limit else None
    return {
        "object": "list",
        "data": [item.model_dump(mode="json") for item in items],
        "next_cursor": cursor,
    }


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
