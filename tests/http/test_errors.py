"""Every failure is answered in the OpenAI error shape, and nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.support import ERROR_KEYS


def assert_error_shape(response: Any) -> dict[str, Any]:
    """Exactly ``{"error": {"message", "type", "param", "code"}}``, with the right types."""
    assert response.status_code >= 400
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert isinstance(error["code"], str)
    assert error["code"]
    return error


@pytest.mark.parametrize(
    "path", ["/nope", "/admin/v1/nope", "/v1/nope", "/admin/v1/accounts/a/b/c"]
)
def test_an_unknown_route_is_an_openai_shaped_404(admin: FlaskClient, path: str) -> None:
    response = admin.get(path)
    assert response.status_code == 404
    assert assert_error_shape(response)["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/healthz"),
        ("PUT", "/admin/v1/accounts"),
        ("DELETE", "/admin/v1/keys/key_x"),
        ("POST", "/v1/models"),
    ],
)
def test_a_wrong_method_is_an_openai_shaped_405(admin: FlaskClient, method: str, path: str) -> None:
    response = admin.open(path, method=method)
    assert response.status_code == 405
    assert assert_error_shape(response)["code"] == "method_not_allowed"


@pytest.mark.parametrize("raw", ['{"name": "x"', "{name: x}", "not json at all", '{"name": "x"}}'])
def test_a_malformed_json_body_is_invalid_json(admin: FlaskClient, raw: str) -> None:
    response = admin.post("/admin/v1/accounts", data=raw, content_type="application/json")
    assert response.status_code == 400
    assert assert_error_shape(response)["code"] == "invalid_json"


def test_a_json_list_body_is_refused_as_not_an_object(admin: FlaskClient) -> None:
    response = admin.post("/admin/v1/accounts", json=[{"name": "x"}])
    assert response.status_code == 400
    error = assert_error_shape(response)
    assert error["code"] == "invalid_request"
    assert "object" in error["message"]


@pytest.mark.parametrize("body", [[{"name": "x"}], "x", 42, None, True])
def test_a_json_body_that_is_not_an_object_is_refused(admin: FlaskClient, body: Any) -> None:
    before = admin.get("/admin/v1/accounts", query_string={"limit": 100}).get_json()
    response = admin.post("/admin/v1/accounts", json=body)
    assert response.status_code == 400
    error = assert_error_shape(response)
    assert (error["code"], error["message"]) == (
        "invalid_request",
        "The request body must be a JSON object.",
    )
    assert admin.get("/admin/v1/accounts", query_string={"limit": 100}).get_json() == before


def test_a_non_json_body_is_refused(admin: FlaskClient) -> None:
    response = admin.post(
        "/admin/v1/accounts", data="name=x", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code in (400, 415)
    assert_error_shape(response)


def test_every_kind_of_failure_has_exactly_the_openai_keys(
    admin: FlaskClient, client: FlaskClient
) -> None:
    account = admin.post("/admin/v1/accounts", json={"name": "errors"}).get_json()
    adjust = f"/admin/v1/accounts/{account['id']}/adjustments"
    first = admin.post(
        adjust, json={"amount_usd": "1", "reason": "r"}, headers={"Idempotency-Key": "e1"}
    )
    assert first.status_code == 201
    failures = {
        401: client.get("/admin/v1/accounts"),
        404: admin.get("/admin/v1/accounts/acct_missing"),
        405: client.delete("/healthz"),
        409: admin.post(
            adjust, json={"amount_usd": "2", "reason": "r"}, headers={"Idempotency-Key": "e1"}
        ),
        400: admin.post(
            adjust, json={"amount_usd": 2, "reason": "r"}, headers={"Idempotency-Key": "e2"}
        ),
    }
    for status, response in failures.items():
        assert response.status_code == status
        assert_error_shape(response)
