"""Fuzzing: schemathesis sends generated requests to every operation of ``/openapi.json``.

The app is the real one (the factory, PostgreSQL, Redis and so authorize's hot path), called
in-process through WSGI, each operation starting from the same seeded data (an account with
money, a key, a gateway token, a webhook endpoint with deliveries, a usage event, a violation)
and rolled back after. Every operation is tried with the credential it requires and with each
other kind (admin, gateway, customer ``sk-`` key, none); with valid data, invalid data, and now
and then a NUL character slipped into a string; against ids that exist and ids that do not.

Every answer must be no 5xx, a status code the document lists for the operation, a content
type and body matching what it documents for that code, and the server log must hold no
traceback. ``FUZZ_EXAMPLES`` (default 12) sets the examples per operation with its own
credential, for a longer run: ``FUZZ_EXAMPLES=200 pytest tests/api/test_fuzz.py``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Connection

from billing.app import create_app
from billing.core.settings import Settings
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN, make_settings
from tests.support import client_with, new_key, rolled_back

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Examples per operation with the credential it requires, and with each other kind of
# credential (refused before anything else is read, so one each suffices).
EXAMPLES_OWN = int(os.environ.get("FUZZ_EXAMPLES", "12"))
EXAMPLES_OTHER = 1
# The parts of a request a NUL is slipped into, in a quarter of the examples: the input behind
# most of the 5xx the first fuzzing found, and one a generator otherwise draws rarely.
NUL_TARGETS = ("path_parameters", "query", "body")

Where = tuple[str | int, ...]


@pytest.fixture(scope="module")
def fuzz_app(
    app: Flask, redis_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Flask:
    """The app on PostgreSQL and Redis (flushed first), so that authorize takes its hot path
    where it can (``app`` has loaded the price table), with a Stripe webhook secret, so that
    Stripe's route checks signatures rather than answering 503."""
    del app
    return create_app(
        make_settings(
            tmp_path_factory.mktemp("fuzz"),
            redis_url=redis_settings.redis_url,
            stripe_webhook_secret="whsec_fuzz",
            # The seeded webhook endpoint is on this machine (ignored where no such setting).
            webhook_allow_private_urls=True,
        )
    )


@pytest.fixture
def fuzz_connection(fuzz_app: Flask) -> Iterator[Connection]:
    """The connection every request of the fuzz app joins, rolled back at the end."""
    runtime: Runtime = fuzz_app.extensions["billing"]
    with rolled_back(runtime) as connection:
        yield connection


@dataclass
class Seed:
    """What exists, so that generated requests also reach past "not found"."""

    customer_key: str
    ids: dict[str, str | int]


def seed(admin: FlaskClient, gateway: FlaskClient) -> Seed:
    """An account with money, a key, a gateway token, a webhook endpoint with deliveries, a
    usage event and a violation, made through the API."""
    endpoint = admin.post(
        "/admin/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hooks"}
    ).get_json()
    account = admin.post("/admin/v1/accounts", json={"name": "fuzz"}).get_json()
    key = new_key(admin, account["id"], rate_limit=None)
    credit = admin.post(
        f"/admin/v1/accounts/{account['id']}/adjustments",
        json={"amount_usd": "50.00", "reason": "fuzz"},
        headers={"Idempotency-Key": "fuzz"},
    )
    assert credit.status_code == 201, credit.get_json()
    token = admin.post("/admin/v1/gateway-tokens", json={"name": "fuzz"}).get_json()
    request_id = str(uuid.uuid4())
    usage = gateway.post(
        "/gateway/v1/usage",
        json={
            "request_id": request_id,
            "key_id": key["id"],
            "model": "doubao-seed-2-0-lite",
            "input_tokens": 10,
            "output_tokens": 5,
        },
    )
    assert usage.status_code == 202, usage.get_json()
    violation = gateway.post(
        "/gateway/v1/violations",
        json={"request_id": request_id, "key_id": key["id"], "category": "fuzz"},
    )
    assert violation.status_code == 202, violation.get_json()
    deliveries = admin.get(f"/admin/v1/webhook-endpoints/{endpoint['id']}/deliveries").get_json()
    assert deliveries["data"], "the key's change to active was queued for the endpoint"
    return Seed(
        customer_key=key["key"],
        ids={
            "account_id": account["id"],
            "key_id": key["id"],
            "model_id": "doubao-seed-2-0-lite",
            "token_id": token["id"],
            "endpoint_id": endpoint["id"],
            "delivery_id": deliveries["data"][0]["id"],
            "request_id": request_id,
        },
    )


@dataclass
class Tally:
    """What the run did and found."""

    operations: int = 0
    requests: int = 0
    server_errors: int = 0
    failures: list[str] = field(default_factory=list)


def text_paths(value: Any, where: Where = ()) -> list[Where]:
    """Where the strings are in ``value`` (nested dicts and lists)."""
    if isinstance(value, str):
        return [where]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in text_paths(item, (*where, key))]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in text_paths(item, (*where, i))]
    return []


def with_nul(value: Any, where: Where) -> Any:
    """``value`` with a NUL character added to the string at ``where``."""
    if not where:
        return f"{value}\x00"
    head, rest = where[0], where[1:]
    if isinstance(value, dict):
        return {**value, head: with_nul(value[head], rest)}
    assert isinstance(head, int)
    return [with_nul(item, rest) if index == head else item for index, item in enumerate(value)]


def fuzz_operation(
    operation: Any, token: str | None, examples: int, seeded: Seed, tally: Tally
) -> None:
    """Send ``examples`` generated requests to ``operation`` with ``token``; count them and
    record every failed check."""
    names = {parameter.name for parameter in operation.path_parameters}
    known = {name: value for name, value in seeded.ids.items() if name in names}
    strategies = [
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    if known:
        strategies.append(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=known)
        )

    @settings(
        max_examples=examples,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies), data=st.data())
    def send(case: schemathesis.Case[Any], data: st.DataObject) -> None:
        case.headers.pop("Authorization", None)
        if token is not None:
            case.headers["Authorization"] = f"Bearer {token}"
        targets = [
            (part, where)
            for part in NUL_TARGETS
            if isinstance(getattr(case, part), dict | list)
            for where in text_paths(getattr(case, part))
        ]
        if targets and data.draw(st.integers(0, 3), label="slip in a NUL") == 0:
            part, where = data.draw(st.sampled_from(targets), label="where")
            setattr(case, part, with_nul(getattr(case, part), where))
        tally.requests += 1
        try:
            response = case.call()
        except Exception as exc:  # raised through the error handlers
            tally.server_errors += 1
            tally.failures.append(f"{operation.label}: raised {exc!r}")
            return
        if response.status_code >= 500:
            tally.server_errors += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as failed:
            tally.failures.append(f"{operation.label} with {token and token[:6]}: {failed}")

    send()


def test_no_input_draws_a_server_error_or_an_undocumented_answer(
    fuzz_app: Flask,
    fuzz_connection: Connection,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.WARNING)
    seeded = seed(client_with(fuzz_app, ADMIN_TOKEN), client_with(fuzz_app, GATEWAY_TOKEN))
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)
    tokens = {
        "admin": ADMIN_TOKEN,
        "gateway": GATEWAY_TOKEN,
        "customer": seeded.customer_key,
        "none": None,
    }
    tally = Tally()
    started = time.monotonic()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # every operation of the document loads
        operation = result.ok()
        tally.operations += 1
        security = operation.definition.raw.get("security") or [{"none": []}]
        required = {name for requirement in security for name in requirement}
        # Each operation starts from the seeded data, whatever the one before did to it.
        savepoint = fuzz_connection.begin_nested()
        for kind, token in tokens.items():
            examples = EXAMPLES_OWN if kind in required else EXAMPLES_OTHER
            fuzz_operation(operation, token, examples, seeded, tally)
        savepoint.rollback()
    tracebacks = [record for record in caplog.records if record.exc_info]
    with capsys.disabled():
        print(
            f"\nfuzzing: {tally.operations} operations, {tally.requests} requests,"
            f" {tally.server_errors} answered 5xx, {len(tally.failures)} failed checks,"
            f" {len(tracebacks)} tracebacks logged, in {time.monotonic() - started:.0f} s"
        )
    assert tally.operations >= 41
    assert tally.requests >= tally.operations * len(tokens)
    assert not tally.failures, "\n\n".join(tally.failures)
    assert tally.server_errors == 0
    assert [record.getMessage() for record in tracebacks] == []
