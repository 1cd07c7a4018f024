"""Authorize refuses bad input as the rest of the API does, on its fast path (``billing.api.hot``,
Redis) as on the Flask route: a body over ``MAX_CONTENT_LENGTH`` is answered 413 unread,
whoever sends it; JSON with a duplicate key or nested too deep, and a model name holding a NUL,
are 400s naming the problem (issue #10, observations 2, 4 and 7)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.enforcement.conftest import Edge
from tests.enforcement.support import new_account, rid
from tests.support import HugeBody, assert_error, new_key

PATH = "/gateway/v1/authorize"
LITE = "doubao-seed-2-0-lite"
FIFTY_MB = 50 * 1024 * 1024


def fast_answers(status: int, code: str) -> float:
    """Authorize answers given on the fast path so far with this status and code."""
    labels = {"status": str(status), "code": code, "path": "fast"}
    return REGISTRY.get_sample_value("billing_authorize_decisions_total", labels) or 0.0


@pytest.fixture
def key(edge: Edge) -> str:
    """A funded key, after one allowed authorize (so the gateway token is remembered and the
    fast path, with Redis, answers what follows)."""
    account_id = new_account(edge.admin, "10")
    secret: str = new_key(edge.admin, account_id, rate_limit="1000 per second")["key"]
    body = {"api_key": secret, "model": LITE, "request_id": rid()}
    assert edge.gateway.post(PATH, json=body).status_code == 200
    return secret


def test_a_nul_in_the_model_is_a_400_naming_it(edge: Edge, key: str) -> None:
    before = fast_answers(400, "invalid_request")
    body = {"api_key": key, "model": f"{LITE}\x00", "request_id": rid()}
    error = assert_error(edge.gateway.post(PATH, json=body), 400, "invalid_request", "model")
    assert "NUL" in error["message"]
    assert fast_answers(400, "invalid_request") == before + (edge.backend == "redis")


@pytest.mark.parametrize(
    ("raw", "param", "says"),
    [
        (
            '{{"api_key": "{key}", "model": "x", "model": "{model}", "request_id": "r"}}',
            "model",
            "more than once",
        ),
        ("[" * 100_000 + "]" * 100_000, None, "nested more than 200 levels"),
    ],
)
def test_json_with_a_duplicate_key_or_nested_too_deep_is_a_400_saying_which(
    edge: Edge, key: str, raw: str, param: str | None, says: str
) -> None:
    body = raw.format(key=key, model=LITE) if "{key}" in raw else raw
    response = edge.gateway.post(PATH, data=body, content_type="application/json")
    error = assert_error(response, 400, "invalid_json", param)
    assert says in error["message"]


@pytest.mark.parametrize(
    "token", ["known", None, "not-a-token"], ids=["known token", "no token", "wrong token"]
)
def test_a_50_mb_body_is_answered_413_unread_whoever_sends_it(
    edge: Edge, key: str, token: str | None
) -> None:
    body = HugeBody(FIFTY_MB)
    headers: dict[str, Any] = {}
    client = edge.gateway if token == "known" else edge.app.test_client()
    if token not in ("known", None):
        headers["Authorization"] = f"Bearer {token}"
    response = client.post(
        PATH,
        content_type="application/json",
        headers=headers,
        environ_overrides={"wsgi.input": body, "CONTENT_LENGTH": str(FIFTY_MB)},
    )
    assert_error(response, 413, "request_too_large")
    assert body.read_bytes == 0


def test_a_body_sent_without_a_length_is_authorized_whole(edge: Edge, key: str) -> None:
    body = json.dumps({"api_key": key, "model": LITE, "request_id": rid()}).encode()
    response = edge.gateway.post(
        PATH,
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True},
    )
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["allow"] is True
