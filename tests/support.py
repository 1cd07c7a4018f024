"""Helpers shared by the tests: HTTP clients and assertions, and what the Redis mirror holds."""

from __future__ import annotations

import datetime as dt
import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection
from sqlalchemy.orm import sessionmaker

from billing.enforcement import mirror
from billing.runtime import Runtime

ERROR_KEYS = {"message", "type", "param", "code"}


@contextmanager
def rolled_back(runtime: Runtime) -> Iterator[Connection]:
    """Every session ``runtime`` opens joins one transaction, rolled back at the end.

    The app's requests join it through savepoints, so a request's commit is visible to the test
    and nothing outlives it.
    """
    original = runtime.sessions
    with runtime.engine.connect() as connection:
        outer = connection.begin()
        runtime.sessions = sessionmaker(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield connection
        finally:
            runtime.sessions = original
            outer.rollback()


def client_with(app: Flask, token: str) -> FlaskClient:
    """An HTTP client of ``app`` sending ``Authorization: Bearer <token>``."""
    test_client = app.test_client()
    test_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return test_client


def report_usage(
    gateway: FlaskClient, key: dict[str, Any], model: str, when: dt.datetime, usage: dict[str, Any]
) -> None:
    """Report one usage event of ``key`` at ``when``; it must be accepted."""
    response = gateway.post(
        "/gateway/v1/usage",
        json={
            "request_id": str(uuid.uuid4()),
            "key_id": key["id"],
            "model": model,
            "usage": usage,
            "occurred_at": when.isoformat(),
        },
    )
    assert response.status_code == 202, response.get_json()


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """``response`` is an OpenAI-shaped error with this status and code (naming ``param``)."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
        if status == 400:  # a validation error names the field it refuses
            assert param in body["error"]["message"]
    return body["error"]


def new_key(admin: FlaskClient, account_id: str, **fields: Any) -> dict[str, Any]:
    """A key of ``account_id`` issued through the admin API (its secret in ``key``)."""
    response = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "k", **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def key_state(admin: FlaskClient, key_id: str) -> tuple[str, int]:
    """A key's state and HTTP status, as the admin API shows them."""
    body = admin.get(f"/admin/v1/keys/{key_id}").get_json()
    return body["state"], body["http_status"]


def mirrored_state(client: redis.Redis, key_id: str) -> dict[str, str]:
    """What the Redis mirror holds for a key (empty if nothing)."""
    stored: dict[bytes, bytes] = client.hgetall(mirror.key_name(key_id))  # type: ignore[assignment]
    return {name.decode(): value.decode() for name, value in stored.items()}


def metric_samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by sample name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value (0 when it is absent, as an untouched counter is)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class HugeBody(io.RawIOBase):
    """A request body of ``size`` bytes made up as it is read, counting what was read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.size - self.read_bytes)
        buffer[:count] = b" " * count
        self.read_bytes += count
        return count
