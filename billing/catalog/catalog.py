"""The price table: models, their versioned prices, and the names they are known by.

Invariants:
- A price version is immutable. A price change is a new version with a later ``effective_from``;
  an event is priced at the version in effect at its ``occurred_at``.
- A new version never reprices the past: it may take effect before now only from an instant at
  which the model had no price (so that usage parked as unpriced can be priced); otherwise it
  starts now or later.
- Model names resolve as: exact id, then an alias, then a dated snapshot name
  (``doubao-seed-2-0-code-preview-260215``) resolved to the base it extends.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.catalog.pricing import Price
from billing.catalog.usage import MAX_TOKENS
from billing.core.db import Base, BigIntId
from billing.core.effects import mark_prices_changed
from billing.core.errors import Conflict, InvalidRequest, NotFound
from billing.core.money import MoneyFormatError, parse_usd

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# A dated snapshot: the base name, an optional "-preview", then a date such as 260215,
# 20260215 or 2026-02-15.
SNAPSHOT = re.compile(r"^(?P<base>.+?)(?:-preview)?-(?:\d{6}|\d{8}|\d{4}-\d{2}-\d{2})$")
MAX_PRICE_NANOS_PER_M = 10_000 * 1_000_000_000  # $10,000 per million tokens


class Model(Base):
    """A model id the gateway may name."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[dt.datetime]


class PriceVersion(Base):
    """One model's prices from ``effective_from`` until the next version, in nanos per 1M tokens."""

    __tablename__ = "price_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "effective_from"),
        CheckConstraint(
            "input_nanos_per_m >= 0 AND output_nanos_per_m >= 0"
            " AND (cached_input_nanos_per_m IS NULL OR cached_input_nanos_per_m >= 0)"
            " AND (reasoning_nanos_per_m IS NULL OR reasoning_nanos_per_m >= 0)",
            name="prices_not_negative",
        ),
        CheckConstraint(
            "max_output_tokens IS NULL OR max_output_tokens > 0", name="max_output_positive"
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    effective_from: Mapped[dt.datetime]
    input_nanos_per_m: Mapped[int] = mapped_column(BigInteger)
    output_nanos_per_m: Mapped[int] = mapped_column(BigInteger)
    cached_input_nanos_per_m: Mapped[int | None] = mapped_column(BigInteger)
    reasoning_nanos_per_m: Mapped[int | None] = mapped_column(BigInteger)
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime]

    @property
    def price(self) -> Price:
        """The prices of this version, for ``billing.catalog.pricing``."""
        return Price(
            input_nanos_per_m=self.input_nanos_per_m,
            output_nanos_per_m=self.output_nanos_per_m,
            cached_input_nanos_per_m=self.cached_input_nanos_per_m,
            reasoning_nanos_per_m=self.reasoning_nanos_per_m,
        )


class ModelAlias(Base):
    """Another spelling of a model id (``doubao-seed-2.0-lite`` for ``doubao-seed-2-0-lite``)."""

    __tablename__ = "model_aliases"

    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    created_at: Mapped[dt.datetime]


class ModelNotFound(NotFound):
    """No model, alias or snapshot of a known model has that name."""

    code = "model_not_found"


@dataclass(frozen=True)
class PriceInput:
    """A price version as an operator states it: USD decimal strings per million tokens."""

    input_price_per_m: str
    output_price_per_m: str
    cached_input_price_per_m: str | None = None
    reasoning_price_per_m: str | None = None
    max_output_tokens: int | None = None

    def to_price(self) -> Price:
        """Exact prices; raises InvalidRequest naming a field that is not a valid price."""
        return Price(
            input_nanos_per_m=_price_field("input_price_per_m", self.input_price_per_m),
            output_nanos_per_m=_price_field("output_price_per_m", self.output_price_per_m),
            cached_input_nanos_per_m=_optional_price(
                "cached_input_price_per_m", self.cached_input_price_per_m
            ),
            reasoning_nanos_per_m=_optional_price(
                "reasoning_price_per_m", self.reasoning_price_per_m
            ),
        )


def _price_field(field: str, text: str) -> int:
    try:
        nanos = parse_usd(text)
    except MoneyFormatError as exc:
        raise InvalidRequest(f"{field} {exc}.", param=field) from None
    if not 0 <= nanos <= MAX_PRICE_NANOS_PER_M:
        raise InvalidRequest(
            f"{field} must be between 0 and 10000 USD per million tokens.", param=field
        )
    return nanos


def _optional_price(field: str, text: str | None) -> int | None:
    return None if text is None else _price_field(field, text)


def resolve_model(session: Session, name: str) -> str:
    """The canonical model id for ``name``; raises ModelNotFound."""
    if session.get(Model, name) is not None:
        return name
    alias = session.get(ModelAlias, name)
    if alias is not None:
        return alias.model_id
    snapshot = SNAPSHOT.match(name)
    if snapshot is not None:
        return resolve_model(session, snapshot["base"])
    raise ModelNotFound(f"The model {name!r} does not exist.", param="model")


def price_version_at(session: Session, model_id: str, at: dt.datetime) -> PriceVersion | None:
    """The version of ``model_id`` in effect at ``at``, or None if it had no price then."""
    return session.scalars(
        select(PriceVersion)
        .where(PriceVersion.model_id == model_id, PriceVersion.effective_from <= at)
        .order_by(PriceVersion.effective_from.desc())
        .limit(1)
    ).first()


def add_price_version(
    session: Session,
    *,
    model_id: str,
    prices: PriceInput,
    effective_from: dt.datetime | None,
    now: dt.datetime,
) -> PriceVersion:
    """Add a price version, creating the model on first use.

    Raises InvalidRequest for a bad id, bad prices, or a version starting in the past at an
    instant the model already had a price (that would reprice settled usage); Conflict if a
    version of that model already starts at that instant.
    """
    if not MODEL_ID.match(model_id):
        raise InvalidRequest(
            "id must be 1-128 characters of letters, digits and . _ : -", param="id"
        )
    if session.get(ModelAlias, model_id) is not None:
        raise Conflict(f"{model_id!r} is already an alias of another model.", param="id")
    if prices.max_output_tokens is not None and not 0 < prices.max_output_tokens <= MAX_TOKENS:
        raise InvalidRequest(
            f"max_output_tokens must be a positive integer of at most {MAX_TOKENS}.",
            param="max_output_tokens",
        )
    price = prices.to_price()
    starts = effective_from or now
    if session.get(Model, model_id) is None:
        session.add(Model(id=model_id, created_at=now))
    elif starts < now and price_version_at(session, model_id, starts) is not None:
        raise InvalidRequest(
            "effective_from is in the past, at a time this model already had a price: a new "
            "version would reprice settled usage. Omit effective_from, or give a time from now "
            "on, or one before the model's first price.",
            param="effective_from",
        )
    if session.scalar(
        select(PriceVersion.id).where(
            PriceVersion.model_id == model_id, PriceVersion.effective_from == starts
        )
    ):
        raise Conflict(
            f"A price version of {model_id!r} already starts at that time.", param="effective_from"
        )
    version = PriceVersion(
        model_id=model_id,
        effective_from=starts,
        input_nanos_per_m=price.input_nanos_per_m,
        output_nanos_per_m=price.output_nanos_per_m,
        cached_input_nanos_per_m=price.cached_input_nanos_per_m,
        reasoning_nanos_per_m=price.reasoning_nanos_per_m,
        max_output_tokens=prices.max_output_tokens,
        created_at=now,
    )
    session.add(version)
    session.flush()
    mark_prices_changed(session)
    return version


def add_alias(session: Session, *, model_id: str, alias: str, now: dt.datetime) -> ModelAlias:
    """Make ``alias`` another name of ``model_id``; idempotent for the same pair.

    Raises ModelNotFound for an unknown model, Conflict if the alias names something else.
    """
    if session.get(Model, model_id) is None:
        raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model_id")
    if not MODEL_ID.match(alias):
        raise InvalidRequest(
            "alias must be 1-128 characters of letters, digits and . _ : -", param="alias"
        )
    if session.get(Model, alias) is not None:
        raise Conflict(f"{alias!r} is a model id, not available as an alias.", param="alias")
    existing = session.get(ModelAlias, alias)
    if existing is not None:
        if existing.model_id != model_id:
            raise Conflict(
                f"{alias!r} is already an alias of {existing.model_id!r}.", param="alias"
            )
        return existing
    row = ModelAlias(alias=alias, model_id=model_id, created_at=now)
    session.add(row)
    session.flush()
    mark_prices_changed(session)
    return row


@dataclass(frozen=True)
class ModelListing:
    """A model with its current price version (None if unpriced) and aliases."""

    model: Model
    current: PriceVersion | None
    aliases: list[str]


def list_models(session: Session, *, now: dt.datetime, priced_only: bool) -> list[ModelListing]:
    """Every model with the version in effect now, in id order."""
    aliases: dict[str, list[str]] = {}
    for row in session.scalars(select(ModelAlias).order_by(ModelAlias.alias)):
        aliases.setdefault(row.model_id, []).append(row.alias)
    listings = []
    for model in session.scalars(select(Model).order_by(Model.id)):
        current = price_version_at(session, model.id, now)
        if current is None and priced_only:
            continue
        listings.append(ModelListing(model, current, aliases.get(model.id, [])))
    return listings


def get_listing(session: Session, model_id: str, *, now: dt.datetime) -> ModelListing:
    """One model with the version in effect now and its aliases; raises ModelNotFound."""
    model = session.get(Model, model_id)
    if model is None:
        raise ModelNotFound(f"The model {model_id!r} does not exist.", param="model_id")
    aliases = session.scalars(
        select(ModelAlias.alias).where(ModelAlias.model_id == model_id).order_by(ModelAlias.alias)
    )
    return ModelListing(model, price_version_at(session, model_id, now), list(aliases))


def import_prices(session: Session, path: Path, *, now: dt.datetime) -> list[PriceVersion]:
    """Load a price file (see ``billing/data/prices.json``); returns the versions it added.

    A model whose current price already equals the file's is left alone, so importing the same
    file twice adds nothing. Raises InvalidRequest naming a bad entry.
    """
    document: dict[str, Any] = json.loads(path.read_text())
    effective_from = document.get("effective_from")
    starts = dt.datetime.fromisoformat(effective_from) if effective_from else None
    added = []
    for entry in document["models"]:
        prices = PriceInput(
            input_price_per_m=entry["input_price_per_m"],
            output_price_per_m=entry["output_price_per_m"],
            cached_input_price_per_m=entry.get("cached_input_price_per_m"),
            reasoning_price_per_m=entry.get("reasoning_price_per_m"),
            max_output_tokens=entry.get("max_output_tokens"),
        )
        current = price_version_at(session, entry["id"], now)
        unchanged = current is not None and (
            current.price == prices.to_price()
            and current.max_output_tokens == prices.max_output_tokens
        )
        if not unchanged:
            added.append(
                add_price_version(
                    session,
                    model_id=entry["id"],
                    prices=prices,
                    effective_from=starts if current is None else None,
                    now=now,
                )
            )
        for alias in entry.get("aliases", []):
            add_alias(session, model_id=entry["id"], alias=alias, now=now)
    return added


def default_price_file() -> Path:
    """The price table that ships with the service (the seed models and prices)."""
    return Path(__file__).parent / "data" / "prices.json"


def has_models(session: Session) -> bool:
    """True once any model exists (an empty database gets the default price table)."""
    return session.scalar(select(Model.id).limit(1)) is not None
