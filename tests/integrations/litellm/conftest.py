"""The whole stack as a reseller runs it, once per module: the billing service (gunicorn, a
Celery worker, PostgreSQL, Redis), a fake OpenAI-compatible upstream, and a real LiteLLM proxy
with the billing integration, registered as the billing service's webhook endpoint.

Customers are made through the admin API; the tests call the proxy with the official ``openai``
SDK and read what was charged from PostgreSQL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import redis
from celery import Celery
from flask import Flask
from sqlalchemy import Engine, create_engine

from billing.core.settings import Settings
from tests.conftest import (
    GATEWAY_TOKEN,
    TEST_DATABASE_URL,
    start_worker,
    truncate_committed,
    worker_env,
)
from tests.integrations.litellm.stack import Proxy, litellm_config, proxy_env, start_proxy
from tests.integrations.litellm.upstream import Upstream
from tests.reliability.conftest import Api, free_port, rows, start_api, stop

# LiteLLM fetches its model price map from the network when imported, unless told not to: the
# map it ships is enough here (the tests that import it, and the proxy: stack.proxy_env).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

WEBHOOK_PATH = "/billing/webhooks"
# LiteLLM imports for a long while, the more so on a busy machine.
PROXY_START_SECONDS = 300


@dataclass
class Customer:
    account_id: str
    key_id: str
    key: str


@dataclass
class Stack:
    billing: Api
    proxy: Proxy
    upstream: Upstream
    engine: Engine
    webhook_endpoint_id: str

    def customer(self, credit_usd: str, *, rate_limit: str | None = "1000 per minute") -> Customer:
        """A funded account with one key (the secret in ``key``)."""
        account_id = self.billing.create_account(f"llm-{uuid.uuid4().hex[:8]}", credit_usd=None)
        if credit_usd != "0":
            response = self.billing.admin(
                "POST",
                f"/accounts/{account_id}/adjustments",
                json={"amount_usd": credit_usd, "reason": "litellm test credit"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert response.status_code == 201, response.text
        response = self.billing.admin(
            "POST", f"/accounts/{account_id}/keys", json={"name": "k", "rate_limit": rate_limit}
        )
        assert response.status_code == 201, response.text
        created = response.json()
        return Customer(account_id, created["id"], created["key"])

    def client(self, customer: Customer) -> openai.OpenAI:
        """The official SDK pointed at the proxy, with no retries of its own."""
        return openai.OpenAI(base_url=f"{self.proxy.base}/v1", api_key=customer.key, max_retries=0)

    def account(self, account_id: str) -> dict[str, Any]:
        response = self.billing.admin("GET", f"/accounts/{account_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def events(self, key_id: str) -> list[Any]:
        return rows(
            self.engine,
            "SELECT request_id, model, status, outcome, input_tokens, cached_tokens,"
            " output_tokens, reasoning_tokens, cost_nanos FROM usage_events"
            " WHERE key_id = :key_id ORDER BY id",
            key_id=key_id,
        )


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(
    app: Flask,
    redis_settings: Settings,
    celery_client: Celery,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The billing service, the proxy registered as its webhook endpoint, and a worker; all
    stopped, and what they wrote removed, when the module ends."""
    workdir = tmp_path_factory.mktemp("litellm")
    engine = create_engine(TEST_DATABASE_URL)
    billing = start_api(worker_env(redis_settings), workdir / "gunicorn.log")
    started: list[Any] = []
    try:
        proxy_port = free_port()
        response = billing.admin(
            "POST",
            "/webhook-endpoints",
            json={"url": f"http://127.0.0.1:{proxy_port}{WEBHOOK_PATH}"},
        )
        assert response.status_code == 201, response.text
        endpoint = response.json()
        env = proxy_env(
            url=billing.base,
            gateway_token=GATEWAY_TOKEN,
            webhook_secret=endpoint["secret"],
            usage_flush_ms="50",
            key_states_poll_seconds="5",
        )
        proxy = start_proxy(
            litellm_config(upstream.base_url, billing=True),
            port=proxy_port,
            env=env,
            workdir=workdir,
        )
        started.append(proxy)
        # The worker starts while LiteLLM imports.
        worker = start_worker(
            redis_settings, celery_client, name=f"llm{os.getpid()}", log=workdir / "worker.log"
        )
        started.append(worker)
        proxy.wait_ready(PROXY_START_SECONDS)
        yield Stack(billing, proxy, upstream, engine, endpoint["id"])
    finally:
        for process in reversed(started):
            if isinstance(process, Proxy):
                process.stop()
            else:
                stop(process)
        stop(billing.process)
        truncate_committed(engine)
        engine.dispose()
        assert redis_settings.redis_url
        redis.Redis.from_url(redis_settings.redis_url).flushdb()
