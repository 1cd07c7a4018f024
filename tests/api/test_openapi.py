"""The OpenAPI document, the docs UI (served locally) and the health check."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from billing.core.errors import BillingError

API_PREFIXES = ("/admin/v1/", "/v1/")


def api_operations(app: Flask) -> list[tuple[str, str]]:
    """(OpenAPI path, lower-case method) of every registered /admin/v1 and /v1 route."""
    operations = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIXES):
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            operations.append((path, method.lower()))
    return operations


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")  # no credentials
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def test_the_document_is_openapi_3_1(document: dict[str, Any]) -> None:
    assert re.fullmatch(r"3\.1\.\d+", document["openapi"])
    assert document["info"]["title"]


def test_every_api_route_is_documented(app: Flask, document: dict[str, Any]) -> None:
    operations = api_operations(app)
    assert ("/admin/v1/accounts/{account_id}/keys", "post") in operations
    assert ("/v1/models", "get") in operations
    missing = [
        f"{method.upper()} {path}"
        for path, method in operations
        if method not in document["paths"].get(path, {})
    ]
    assert missing == []


def test_bearer_security_is_declared_and_applied(app: Flask, document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    for name in ("admin", "customer"):
        assert schemes[name]["type"] == "http"
        assert schemes[name]["scheme"].lower() == "bearer"
    for path, method in api_operations(app):
        security = document["paths"][path][method].get("security")
        expected = "admin" if path.startswith("/admin/") else "customer"
        assert security == [{expected: []}], f"{method.upper()} {path}"


# OpenAI's former dashboard shape, kept for the chat clients that do arithmetic on it: the one
# body whose money fields are JSON numbers (computed from exact nano-dollars, rounded once).
OPENAI_COMPATIBLE_NUMBERS = {"BillingSubscriptionOut"}


def test_money_fields_are_documented_as_strings(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in OPENAI_COMPATIBLE_NUMBERS:
        for field, spec in schemas[name]["properties"].items():
            if field.endswith("_usd"):
                assert spec["type"] == "number", (name, field)
    money = [
        (name, field, spec)
        for name, schema in schemas.items()
        for field, spec in schema.get("properties", {}).items()
        if (field.endswith("_usd") or field.endswith("_price_per_m"))
        and name not in OPENAI_COMPATIBLE_NUMBERS
    ]
    assert money  # there are some
    for name, field, spec in money:
        types = {spec.get("type")} | {option.get("type") for option in spec.get("anyOf", [])}
        assert "string" in types, (name, field)
        assert not types & {"number", "integer"}, (name, field)


def test_the_docs_ui_is_served_from_this_app(client: FlaskClient) -> None:
    response = client.get("/docs/swagger")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "http://" not in html
    assert "https://" not in html
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any(asset.endswith(".js") for asset in assets)
    assert any(asset.endswith(".css") for asset in assets)
    for asset in assets:
        assert not asset.startswith("//"), asset
        url = urlsplit(urljoin("http://localhost/docs/swagger", asset))
        assert url.netloc == "localhost", asset
        fetched = client.get(url.path)
        assert fetched.status_code == 200, asset
        assert fetched.data


def test_health(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"
    assert response.get_json()["database"] == "ok"


def test_every_operation_documents_the_errors_any_route_can_give(document: dict[str, Any]) -> None:
    operations = [
        (path, method, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]
    assert len(operations) >= 41
    for path, method, operation in operations:
        for status in ("400", "413", "503"):
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)


def subclasses(cls: type[BillingError]) -> set[type[BillingError]]:
    return {cls} | {found for sub in cls.__subclasses__() for found in subclasses(sub)}


def test_every_error_type_an_answer_can_carry_is_documented(
    app: Flask, document: dict[str, Any]
) -> None:
    documented = document["components"]["schemas"]["ErrorDetail"]["properties"]["type"]["enum"]
    raised = {error.type for error in subclasses(BillingError)}
    assert raised | {"server_error"} <= set(documented)
    usage = document["components"]["schemas"]["UsageRejection"]["properties"]["error"]
    assert usage == {"$ref": "#/components/schemas/ErrorDetail"}


def test_the_usage_report_documents_its_csv_form(document: dict[str, Any]) -> None:
    content = document["paths"]["/admin/v1/usage"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/csv"}


def _schema(document: dict[str, Any], path: str, status: str) -> dict[str, Any]:
    """The component schema a gateway route answers ``status`` with."""
    content = document["paths"][path]["post"]["responses"][status]["content"]
    name = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


def test_the_gateway_contract_v2_is_documented(document: dict[str, Any]) -> None:
    authorize = "/gateway/v1/authorize"
    statuses = set(document["paths"][authorize]["post"]["responses"])
    assert {"200", "400", "401", "402", "403", "409", "429", "451", "503"} <= statuses
    answer = _schema(document, authorize, "200")
    assert {
        "max_output_tokens",
        "clipped",
        "state",
        "rate_limit",
        "monthly_cap_usd",
        "month_spend_usd",
    } <= set(answer["properties"]) & set(answer["required"])
    body = document["paths"][authorize]["post"]["requestBody"]["content"]["application/json"]
    request = document["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert {"input_bytes", "clip"} <= set(request["properties"])
    assert request["properties"]["clip"]["default"] is True

    verify = "/gateway/v1/keys/verify"
    assert {"200", "400", "401", "503"} <= set(document["paths"][verify]["post"]["responses"])
    key = _schema(document, verify, "200")
    assert set(key["properties"]["state"]["enum"]) == {
        "active",
        "insufficient_balance",
        "monthly_quota_exceeded",
        "suspended",
    }
    assert {"http_status", "code", "allowed_models", "rate_limit"} <= set(key["required"])

    release = "/gateway/v1/holds/{hold_id}/release"
    assert {"200", "404", "503"} <= set(document["paths"][release]["post"]["responses"])
    released = _schema(document, release, "200")
    assert set(released["properties"]["status"]["enum"]) == {"released", "settled", "expired"}
    assert released["properties"]["released_usd"]["type"] == "string"

    feed = document["components"]["schemas"]["KeyStateChangeOut"]
    assert {"code", "sequence"} <= set(feed["required"])
