"""Models, versioned prices and aliases over the admin API."""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.catalog import catalog
from tests.support import assert_error

USD = re.compile(r"[0-9]+\.[0-9]{9}")
PRICE_FIELDS = (
    "input_price_per_m",
    "output_price_per_m",
    "cached_input_price_per_m",
    "reasoning_price_per_m",
)
SEED = json.loads(catalog.default_price_file().read_text())


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def nanos(usd: str) -> int:
    return int(Decimal(usd) * 10**9)


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def listing(admin: FlaskClient) -> dict[str, dict[str, Any]]:
    response = admin.get("/admin/v1/models")
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    return {model["id"]: model for model in body["data"]}


def add_version(
    admin: FlaskClient,
    model_id: str,
    input_price: str = "0.5",
    output_price: str = "2.5",
    **extra: Any,
) -> Any:
    return admin.post(
        "/admin/v1/models",
        json={
            "id": model_id,
            "input_price_per_m": input_price,
            "output_price_per_m": output_price,
            **extra,
        },
    )


def assert_prices(pricing: dict[str, Any], expected: dict[str, str]) -> None:
    for field in PRICE_FIELDS:
        assert isinstance(pricing[field], str), field
        assert USD.fullmatch(pricing[field]), pricing[field]
        assert Decimal(pricing[field]) == Decimal(expected[field]), field


# --- the seed table ------------------------------------------------------------------------------


def test_the_seed_models_are_listed_with_exact_prices_and_aliases(admin: FlaskClient) -> None:
    models = listing(admin)
    assert len(SEED["models"]) == 3
    for seed in SEED["models"]:
        model = models[seed["id"]]
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert model["aliases"] == seed["aliases"]
        pricing = model["pricing"]
        assert_prices(
            pricing,
            {
                "input_price_per_m": seed["input_price_per_m"],
                "output_price_per_m": seed["output_price_per_m"],
                # Unset in the seed: default to input and output.
                "cached_input_price_per_m": seed["input_price_per_m"],
                "reasoning_price_per_m": seed["output_price_per_m"],
            },
        )
        assert pricing["max_output_tokens"] == seed["max_output_tokens"]
        assert parse_time(pricing["effective_from"]) == dt.datetime.fromisoformat(
            SEED["effective_from"]
        )


# --- adding models and versions ------------------------------------------------------------------


def test_add_a_model_then_a_later_version(admin: FlaskClient, db: Session) -> None:
    created = add_version(admin, "doubao-seed-2-0-pro", "0.79", "3.95", max_output_tokens=65536)
    assert created.status_code == 201, created.get_json()
    model = created.get_json()
    assert model["id"] == "doubao-seed-2-0-pro"
    assert model["aliases"] == []
    first = model["pricing"]
    assert_prices(
        first,
        {
            "input_price_per_m": "0.79",
            "output_price_per_m": "3.95",
            "cached_input_price_per_m": "0.79",
            "reasoning_price_per_m": "3.95",
        },
    )
    assert first["max_output_tokens"] == 65536
    assert abs(parse_time(first["effective_from"]) - now()) < dt.timedelta(minutes=1)
    assert listing(admin)["doubao-seed-2-0-pro"] == model

    later = now().replace(microsecond=0) + dt.timedelta(days=7)
    second = add_version(
        admin,
        "doubao-seed-2-0-pro",
        "0.69",
        "2.99",
        cached_input_price_per_m="0.1",
        reasoning_price_per_m="5",
        effective_from=later.isoformat(),
    )
    assert second.status_code == 201, second.get_json()
    # The version in effect now is still the first one.
    assert second.get_json()["pricing"] == first
    assert listing(admin)["doubao-seed-2-0-pro"]["pricing"] == first

    # The catalog answers the version in effect at any instant.
    start = parse_time(first["effective_from"])
    assert (
        catalog.price_version_at(db, "doubao-seed-2-0-pro", start - dt.timedelta(microseconds=1))
        is None
    )
    at_start = catalog.price_version_at(db, "doubao-seed-2-0-pro", start)
    assert at_start is not None
    assert at_start.id == first["version_id"]
    before = catalog.price_version_at(
        db, "doubao-seed-2-0-pro", later - dt.timedelta(microseconds=1)
    )
    at = catalog.price_version_at(db, "doubao-seed-2-0-pro", later)
    after = catalog.price_version_at(db, "doubao-seed-2-0-pro", later + dt.timedelta(days=365))
    assert before is not None
    assert before.id == first["version_id"]
    assert at is not None
    assert after is not None
    assert at.id == after.id != first["version_id"]
    assert at.effective_from == later
    assert (at.input_nanos_per_m, at.output_nanos_per_m) == (nanos("0.69"), nanos("2.99"))
    assert (at.cached_input_nanos_per_m, at.reasoning_nanos_per_m) == (nanos("0.1"), nanos("5"))


def test_a_new_version_of_a_seed_model_starting_later_is_accepted(admin: FlaskClient) -> None:
    seed = SEED["models"][0]
    later = now() + dt.timedelta(hours=1)
    response = add_version(admin, seed["id"], "9", "9", effective_from=later.isoformat())
    assert response.status_code == 201, response.get_json()
    assert Decimal(response.get_json()["pricing"]["input_price_per_m"]) == Decimal(
        seed["input_price_per_m"]
    )


def test_backdating_a_priced_model_is_refused(admin: FlaskClient) -> None:
    seed = SEED["models"][1]
    before = listing(admin)[seed["id"]]
    yesterday = now() - dt.timedelta(days=1)
    assert_error(
        add_version(admin, seed["id"], "0.01", "0.01", effective_from=yesterday.isoformat()),
        400,
        "invalid_request",
        "effective_from",
    )
    assert listing(admin)[seed["id"]] == before


def test_a_backdated_first_version_of_a_new_model_is_accepted(
    admin: FlaskClient, db: Session
) -> None:
    since = (now() - dt.timedelta(days=30)).replace(microsecond=0)
    response = add_version(admin, "late-priced-model", "1", "2", effective_from=since.isoformat())
    assert response.status_code == 201, response.get_json()
    pricing = response.get_json()["pricing"]
    assert parse_time(pricing["effective_from"]) == since
    version = catalog.price_version_at(db, "late-priced-model", since + dt.timedelta(days=1))
    assert version is not None
    assert version.id == pricing["version_id"]
    # Now that it has a price, a second backdated version would reprice the past.
    assert_error(
        add_version(
            admin,
            "late-priced-model",
            "1",
            "3",
            effective_from=(since + dt.timedelta(days=1)).isoformat(),
        ),
        400,
        "invalid_request",
        "effective_from",
    )


def test_a_duplicate_effective_from_is_a_conflict(admin: FlaskClient) -> None:
    starts = (now() + dt.timedelta(days=2)).isoformat()
    assert add_version(admin, "twice-model", effective_from=starts).status_code == 201
    assert_error(
        add_version(admin, "twice-model", "7", "7", effective_from=starts),
        409,
        "conflict",
        "effective_from",
    )


def test_a_model_with_only_a_future_price_is_listed_unpriced(admin: FlaskClient) -> None:
    response = add_version(
        admin, "future-model", effective_from=(now() + dt.timedelta(days=1)).isoformat()
    )
    assert response.status_code == 201
    assert response.get_json()["pricing"] is None
    assert listing(admin)["future-model"]["pricing"] is None


@pytest.mark.parametrize("field", PRICE_FIELDS)
@pytest.mark.parametrize("value", [1, 0.39])
def test_a_price_as_a_json_number_is_refused(admin: FlaskClient, field: str, value: Any) -> None:
    response = admin.post(
        "/admin/v1/models",
        json={
            "id": "numeric-model",
            "input_price_per_m": "1",
            "output_price_per_m": "1",
            field: value,
        },
    )
    error = assert_error(response, 400, "invalid_request", field)
    assert "string" in error["message"]
    assert "numeric-model" not in listing(admin)


@pytest.mark.parametrize("field", PRICE_FIELDS)
@pytest.mark.parametrize("value", ["-0.01", "10000.000000001", "1e2", "abc", "0.0000000001"])
def test_an_out_of_range_or_malformed_price_is_refused(
    admin: FlaskClient, field: str, value: str
) -> None:
    response = admin.post(
        "/admin/v1/models",
        json={
            "id": "bad-price-model",
            "input_price_per_m": "1",
            "output_price_per_m": "1",
            field: value,
        },
    )
    assert_error(response, 400, "invalid_request", field)
    assert "bad-price-model" not in listing(admin)


def test_the_price_bounds_are_inclusive(admin: FlaskClient) -> None:
    response = add_version(admin, "edge-model", "0", "10000")
    assert response.status_code == 201, response.get_json()
    pricing = response.get_json()["pricing"]
    assert Decimal(pricing["input_price_per_m"]) == 0
    assert Decimal(pricing["output_price_per_m"]) == 10000


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input_price_per_m": "1", "output_price_per_m": "1"}, "id"),
        ({"id": "m", "output_price_per_m": "1"}, "input_price_per_m"),
        ({"id": "has space", "input_price_per_m": "1", "output_price_per_m": "1"}, "id"),
        (
            {
                "id": "m",
                "input_price_per_m": "1",
                "output_price_per_m": "1",
                "max_output_tokens": 0,
            },
            "max_output_tokens",
        ),
        (
            {
                "id": "m",
                "input_price_per_m": "1",
                "output_price_per_m": "1",
                "max_output_tokens": "9",
            },
            "max_output_tokens",
        ),
        (
            {"id": "m", "input_price_per_m": "1", "output_price_per_m": "1", "currency": "USD"},
            "currency",
        ),
        (
            {
                "id": "m",
                "input_price_per_m": "1",
                "output_price_per_m": "1",
                "effective_from": "2099-01-01",
            },
            "effective_from",
        ),
    ],
)
def test_a_malformed_price_version_is_refused(
    admin: FlaskClient, body: dict[str, Any], param: str
) -> None:
    assert_error(admin.post("/admin/v1/models", json=body), 400, "invalid_request", param)


def test_a_model_id_that_is_an_alias_is_refused(admin: FlaskClient) -> None:
    alias = SEED["models"][0]["aliases"][0]
    assert_error(add_version(admin, alias), 409, "conflict", "id")


# --- aliases -------------------------------------------------------------------------------------


def test_add_an_alias_idempotently(admin: FlaskClient) -> None:
    assert add_version(admin, "doubao-seed-2-0-pro").status_code == 201
    first = admin.post(
        "/admin/v1/models/doubao-seed-2-0-pro/aliases", json={"alias": "doubao-seed-2.0-pro"}
    )
    assert first.status_code == 201, first.get_json()
    assert first.get_json() == {
        "object": "model_alias",
        "alias": "doubao-seed-2.0-pro",
        "model_id": "doubao-seed-2-0-pro",
    }
    again = admin.post(
        "/admin/v1/models/doubao-seed-2-0-pro/aliases", json={"alias": "doubao-seed-2.0-pro"}
    )
    assert again.status_code in (200, 201)
    assert again.get_json() == first.get_json()
    assert listing(admin)["doubao-seed-2-0-pro"]["aliases"] == ["doubao-seed-2.0-pro"]


def test_an_alias_resolves_for_key_allow_lists(admin: FlaskClient) -> None:
    assert add_version(admin, "aliased-model").status_code == 201
    assert (
        admin.post("/admin/v1/models/aliased-model/aliases", json={"alias": "nickname"}).status_code
        == 201
    )
    account = admin.post("/admin/v1/accounts", json={"name": "a"}).get_json()
    key = admin.post(
        f"/admin/v1/accounts/{account['id']}/keys",
        json={"name": "k", "allowed_models": ["nickname"]},
    )
    assert key.status_code == 201
    assert key.get_json()["allowed_models"] == ["aliased-model"]


def test_an_alias_of_an_unknown_model_is_404(admin: FlaskClient) -> None:
    response = admin.post("/admin/v1/models/no-such-model/aliases", json={"alias": "whatever"})
    assert_error(response, 404, "model_not_found", "model_id")


def test_an_alias_that_is_a_model_id_is_a_conflict(admin: FlaskClient) -> None:
    lite, code = SEED["models"][1]["id"], SEED["models"][2]["id"]
    assert_error(
        admin.post(f"/admin/v1/models/{code}/aliases", json={"alias": lite}),
        409,
        "conflict",
        "alias",
    )
    assert listing(admin)[code]["aliases"] == SEED["models"][2]["aliases"]


def test_an_alias_already_pointing_elsewhere_is_a_conflict(admin: FlaskClient) -> None:
    assert add_version(admin, "doubao-seed-2-0-pro").status_code == 201
    taken = SEED["models"][1]["aliases"][0]
    response = admin.post("/admin/v1/models/doubao-seed-2-0-pro/aliases", json={"alias": taken})
    error = assert_error(response, 409, "conflict", "alias")
    assert SEED["models"][1]["id"] in error["message"]
    models = listing(admin)
    assert models["doubao-seed-2-0-pro"]["aliases"] == []
    assert taken in models[SEED["models"][1]["id"]]["aliases"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "alias"),
        ({"alias": ""}, "alias"),
        ({"alias": "bad alias"}, "alias"),
        ({"alias": "x", "to": "y"}, "to"),
    ],
)
def test_a_malformed_alias_is_refused(admin: FlaskClient, body: dict[str, Any], param: str) -> None:
    model_id = SEED["models"][0]["id"]
    assert_error(
        admin.post(f"/admin/v1/models/{model_id}/aliases", json=body), 400, "invalid_request", param
    )


def test_a_version_may_start_before_the_first_price_but_not_inside_a_priced_span(
    admin: FlaskClient, db: Session
) -> None:
    # Priced from now on, with usage parked before: a version starting before the first price
    # covers only that unpriced span, so it reprices nothing and is accepted.
    first = add_version(admin, "priced-late", "1", "2")
    assert first.status_code == 201, first.get_json()
    earlier = (now() - dt.timedelta(days=10)).replace(microsecond=0)
    response = add_version(admin, "priced-late", "1", "1", effective_from=earlier.isoformat())
    assert response.status_code == 201, response.get_json()
    version = catalog.price_version_at(db, "priced-late", earlier + dt.timedelta(days=1))
    assert version is not None and version.output_nanos_per_m == 1_000_000_000
    # Inside the span that now has a price, backdating is refused again.
    assert_error(
        add_version(
            admin,
            "priced-late",
            "5",
            "5",
            effective_from=(earlier + dt.timedelta(days=1)).isoformat(),
        ),
        400,
        "invalid_request",
        "effective_from",
    )
