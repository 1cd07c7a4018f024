"""Real processes for the reliability tests: a gunicorn API reached over HTTP, real Celery
workers, and the helpers that set data up through the admin API and read the outcome from
PostgreSQL (the faults they inject are in ``tests.reliability.faults``).

Every wait is bounded; every process started here is stopped here, by its own handle.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery import Celery
from sqlalchemy import Engine, text

from billing.core.settings import Settings
from tests.conftest import (
    ADMIN_TOKEN,
    GATEWAY_TOKEN,
    QUEUES,
    TEST_DATABASE_URL,
    worker_command,
    worker_env,
)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
# Every wait of this package gives up after this long (seconds).
DEADLINE = 30.0
# doubao-seed-2-0-mini, the shipped price table: $0.14 and $0.69 per million tokens, that is
# 140 and 690 nano-dollars per token.
MODEL = "doubao-seed-2-0-mini"
INPUT_NANOS, OUTPUT_NANOS = 140, 690


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], what: str, *, timeout: float = DEADLINE, every: float = 0.05
) -> Any:
    """Poll until ``predicate()`` is truthy (and return it), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def stop(process: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its handle; kill it if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(sig)
        process.send_signal(signal.SIGCONT)  # in case a test left it stopped
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def with_query(url: str, **params: str) -> str:
    """``url`` with query parameters added (``application_name`` for pg_stat_activity)."""
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return url + ("&" if "?" in url else "?") + query


# The API: gunicorn over HTTP


@dataclass
class Api:
    """A gunicorn serving ``billing.wsgi:app``, and authenticated clients for it."""

    base: str
    process: subprocess.Popen[bytes]
    log: Path

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} | kwargs.pop("headers", {})
        return requests.request(
            method, f"{self.base}/admin/v1{path}", headers=headers, timeout=10, **kwargs
        )

    def post_usage(
        self, events: list[dict[str, Any]], *, session: requests.Session | None = None
    ) -> requests.Response:
        sender = session or requests
        return sender.post(
            f"{self.base}/gateway/v1/usage",
            json={"events": events},
            headers={"Authorization": f"Bearer {GATEWAY_TOKEN}"},
            timeout=30,
        )

    def create_account(self, name: str, *, credit_usd: str | None) -> str:
        response = self.admin("POST", "/accounts", json={"name": name})
        assert response.status_code == 201, response.text
        account_id: str = response.json()["id"]
        if credit_usd is not None:
            response = self.admin(
                "POST",
                f"/accounts/{account_id}/adjustments",
                json={"amount_usd": credit_usd, "reason": "reliability test credit"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert response.status_code == 201, response.text
        return account_id

    def create_key(self, account_id: str, name: str = "key") -> str:
        response = self.admin("POST", f"/accounts/{account_id}/keys", json={"name": name})
        assert response.status_code == 201, response.text
        key_id: str = response.json()["id"]
        return key_id

    def balance_usd(self, account_id: str) -> str:
        response = self.admin("GET", f"/accounts/{account_id}")
        assert response.status_code == 200, response.text
        balance: str = response.json()["balance_usd"]
        return balance


def start_api(env: dict[str, str], log: Path, *, workers: int = 2, threads: int = 4) -> Api:
    """A real gunicorn process on a free loopback port, returned once /healthz answers 200."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "gunicorn"),
            "billing.wsgi:app",
            f"--bind=127.0.0.1:{port}",
            f"--workers={workers}",
            f"--threads={threads}",
            "--graceful-timeout=5",
            "--no-control-socket",  # no socket shared with other gunicorns of this machine
        ],
        cwd=ROOT,
        env=env | {"PORT": str(port)},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited with {process.returncode}:\n{log.read_text()}")
        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, "gunicorn to answer /healthz", every=0.1)
    except BaseException:
        stop(process)
        raise
    return Api(base, process, log)


# The brokers the worker tests run on: Redis (the default) and RabbitMQ (CELERY_BROKER_URL).
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = ("redis", "rabbitmq")


@pytest.fixture(scope="module")
def broker(request: pytest.FixtureRequest) -> str:
    """The broker of the API and workers of the module's tests: Redis, unless a test is
    parametrised over ``BROKERS`` (``indirect=True, scope="module"``)."""
    name: str = getattr(request, "param", "redis")
    assert name in BROKERS
    return name


@pytest.fixture(scope="module")
def broker_settings(redis_settings: Settings, broker: str) -> Settings:
    """The test settings, with ``broker`` as the Celery broker (Redis stays for the rest)."""
    if broker == "redis":
        return redis_settings
    return redis_settings.model_copy(update={"celery_broker_url": RABBITMQ_URL})


@pytest.fixture(scope="module")
def celery_client(broker_settings: Settings) -> Celery:
    """A Celery app that sends tasks through the module's broker to real worker processes."""
    from billing.app import create_app

    celery: Celery = create_app(broker_settings).extensions["celery"]
    return celery


@pytest.fixture(scope="module")
def api(
    broker_settings: Settings, app: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """One gunicorn for the module (``app`` has loaded the shipped price table first)."""
    server = start_api(
        worker_env(broker_settings), tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    )
    yield server
    stop(server.process)


@pytest.fixture(autouse=True)
def redis_client(redis_settings: Settings) -> Iterator[redis.Redis]:
    """The test Redis database, flushed before and after every test."""
    assert redis_settings.redis_url
    client = redis.Redis.from_url(redis_settings.redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# Celery workers


@dataclass
class Worker:
    name: str
    application_name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def task_results(self, task: str) -> list[int]:
        """The return values this worker logged for ``task`` (Celery logs them at INFO)."""
        pattern = re.compile(rf"Task {re.escape(task)}\[[\w-]+\] succeeded in [\d.e-]+s: (-?\d+)")
        return [int(value) for value in pattern.findall(self.log_text())]

    def received(self, task: str) -> int:
        return len(re.findall(rf"Task {re.escape(task)}\[[\w-]+\] received", self.log_text()))


@dataclass
class Workers:
    """Starts real ``celery worker`` processes and stops every one of them at teardown."""

    settings: Settings
    celery: Celery
    directory: Path
    started: list[Worker] = field(default_factory=list)
    _serial: Iterator[int] = field(default_factory=itertools.count)

    def start(
        self, count: int = 1, *, queues: tuple[str, ...] = QUEUES, as_in_production: bool = False
    ) -> list[Worker]:
        """``count`` workers consuming ``queues``, started together, returned once each answers
        a ping (``as_in_production``: see ``worker_command``)."""
        batch = []
        for _ in range(count):
            serial = next(self._serial)
            name = f"rel{os.getpid()}n{serial}"
            application_name = f"billing-worker-{name}"
            env = worker_env(self.settings) | {
                "DATABASE_URL": with_query(TEST_DATABASE_URL, application_name=application_name)
            }
            log = self.directory / f"{name}.log"
            process = subprocess.Popen(
                worker_command(name, queues, as_in_production=as_in_production),
                cwd=ROOT,
                env=env,
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
            )
            worker = Worker(name, application_name, process, log)
            self.started.append(worker)
            batch.append(worker)
        waiting = {worker.name for worker in batch}
        deadline = time.monotonic() + DEADLINE * 2
        while waiting:
            for worker in batch:
                if worker.process.poll() is not None:
                    pytest.fail(f"worker {worker.name} exited:\n{worker.log_text()}")
            replies = self.celery.control.ping(timeout=0.5) or []
            waiting -= {name.split("@")[0] for reply in replies for name in reply}
            if waiting and time.monotonic() > deadline:
                pytest.fail(f"workers {sorted(waiting)} did not answer a ping")
        return batch

    def stop_all(self) -> None:
        for worker in self.started:
            stop(worker.process)


@pytest.fixture
def workers(
    committed: Engine, broker_settings: Settings, celery_client: Celery, tmp_path: Path
) -> Iterator[Workers]:
    """Worker processes on the module's broker, stopped before ``committed`` truncates the
    tables."""
    pool = Workers(broker_settings, celery_client, tmp_path)
    yield pool
    pool.stop_all()


# Usage events and what PostgreSQL says about them


def usage_event(
    request_id: str, key_id: str, input_tokens: int, output_tokens: int, occurred_at: str
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "key_id": key_id,
        "model": MODEL,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "occurred_at": occurred_at,
    }


def cost_nanos(event: dict[str, Any]) -> int:
    """The event's cost, computed here from the shipped prices, independently of billing."""
    return int(event["input_tokens"]) * INPUT_NANOS + int(event["output_tokens"]) * OUTPUT_NANOS


def recent(minutes: int = 5) -> str:
    """An RFC 3339 instant a little in the past (after the shipped prices took effect)."""
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)
    return moment.isoformat().replace("+00:00", "Z")


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(sql), params).scalar()


def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(text(sql), params))


def status_counts(engine: Engine) -> dict[str, int]:
    return {
        status: count
        for status, count in rows(
            engine, "SELECT status, count(*) FROM usage_events GROUP BY status"
        )
    }
