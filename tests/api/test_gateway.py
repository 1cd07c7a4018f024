"""What the gateway edge renders itself: batch rejections in the one error shape, and the usage
body's OpenAPI description generated from its pydantic models."""

from __future__ import annotations

import uuid
from typing import Any

from flask.testing import FlaskClient

from billing.api.gateway import report_shape
from tests.support import ERROR_KEYS, assert_error, new_key

USAGE = "/gateway/v1/usage"


def _event(key: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "request_id": f"req-{uuid.uuid4()}",
        "key_id": key["id"],
        "model": "doubao-seed-2-0-lite",
        "input_tokens": 10,
        "output_tokens": 2,
        **fields,
    }


def test_each_rejected_item_has_the_whole_error_shape(
    admin: FlaskClient, gateway: FlaskClient
) -> None:
    account_id = admin.post("/admin/v1/accounts", json={"name": "edge"}).get_json()["id"]
    key = new_key(admin, account_id)
    good = _event(key)
    first = _event(key)
    conflict = {**first, "output_tokens": 3}
    unknown = _event(key, key_id="key_unknown")
    batch = [
        good,
        first,
        "not an object",
        {**_event(key), "outcome": "exploded"},
        conflict,
        unknown,
    ]
    response = gateway.post(USAGE, json={"events": batch})
    assert response.status_code == 202, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["accepted"] == 2
    expected = [
        (2, "invalid_request", "events[2]"),
        (3, "invalid_request", "events[3].outcome"),
        (4, "request_id_conflict", "events[4].request_id"),
        (5, "invalid_api_key", "events[5].key_id"),
    ]
    assert [item["index"] for item in answer["rejected"]] == [index for index, *_ in expected]
    for item, (_, code, param) in zip(answer["rejected"], expected, strict=True):
        error = item["error"]
        assert set(error) == ERROR_KEYS, item
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            code,
            param,
        ), item
        assert param in error["message"], item


def test_a_single_rejected_event_is_answered_with_its_error(
    admin: FlaskClient, gateway: FlaskClient
) -> None:
    account_id = admin.post("/admin/v1/accounts", json={"name": "edge"}).get_json()["id"]
    key = new_key(admin, account_id)
    response = gateway.post(USAGE, json=_event(key, outcome="exploded"))
    assert_error(response, 400, "invalid_request", "outcome")


def test_the_usage_body_is_documented_as_one_event_or_a_batch(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    body = document["paths"][USAGE]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "oneOf": [
            {"$ref": "#/components/schemas/UsageEventIn"},
            {"$ref": "#/components/schemas/UsageBatchIn"},
        ]
    }
    schemas = document["components"]["schemas"]
    assert schemas["UsageBatchIn"]["properties"]["events"]["maxItems"] == 1000
    assert {"request_id", "model"} <= set(schemas["UsageEventIn"]["required"])
    rejection = schemas["UsageRejection"]["properties"]["error"]["$ref"].rsplit("/", 1)[-1]
    assert set(schemas[rejection]["required"]) == ERROR_KEYS


def test_the_documented_shape_is_the_one_the_view_reads() -> None:
    assert report_shape({"events": []}) == "batch"
    assert report_shape({"request_id": "r", "model": "m"}) == "event"
    assert report_shape(["not", "an", "object"]) == "event"
