"""docker-compose.yml is the tested topology.

There is no Docker engine here, so the test reads the compose file and runs each billing
service's ``command`` as a real process on this machine, with the compose environment mapped to
local addresses: ``postgres:5432`` to a fresh database on the test PostgreSQL, ``redis:6379`` to
the test Redis database, the API's ``0.0.0.0:8000`` to a free loopback port. Each process gets
what its container would have of its own: a home, a ``/tmp`` and a host name. Then a black-box
flow over HTTP proves the services work together: migrate, serve, settle, enforce, notify.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import requests
import yaml
from celery import Celery
from sqlalchemy.engine import URL, make_url

from tests.conftest import (
    ADMIN_TOKEN,
    GATEWAY_TOKEN,
    SECRET_KEY,
    TEST_DATABASE_URL,
    TEST_REDIS_URL,
    _recreate_database,
)
from tests.notify.conftest import Receiver, key_changes, start_receiver
from tests.reliability.conftest import BIN, MODEL, ROOT, Api, free_port, stop, wait_until

COMPOSE = ROOT / "docker-compose.yml"
BILLING_SERVICES = ("migrate", "api", "worker", "webhook-worker", "maintenance-worker", "beat")
WORKERS = ("worker", "webhook-worker", "maintenance-worker")
# What the operator's .env would hold; the tokens are those the test clients send.
METRICS_TOKEN = "compose-metrics-token"
DOTENV = {
    "SECRET_KEY": SECRET_KEY,
    "METRICS_TOKEN": METRICS_TOKEN,
    "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
    "BILLING_GATEWAY_TOKEN": GATEWAY_TOKEN,
    "WEBHOOK_ALLOW_PRIVATE_URLS": "true",  # the test's webhook receiver is on 127.0.0.1
}
# Seconds a step of the flow may take on a busy 2-core machine before the test gives up.
DEADLINE = 60.0


# Compose's variable interpolation

_REFERENCE = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", re.DOTALL)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with Compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}`` and ``${VAR?message}`` resolved from ``env`` (``$$`` is a ``$``).

    Raises ValueError naming the variable when a required one is missing, or for a form this
    does not implement.
    """

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(2) is not None:
            return env.get(match.group(2), "")
        braced = _BRACED.fullmatch(match.group(1))
        if braced is None:
            raise ValueError(f"unsupported interpolation {match.group(0)!r}")
        name, operator, argument = braced.groups()
        value = env.get(name)
        if operator is None:
            return value or ""
        # With a colon, an empty value counts as missing; without, only an unset one does.
        missing = value is None or (operator.startswith(":") and value == "")
        if operator.endswith("-"):
            return argument if missing or value is None else value
        if missing or value is None:
            raise ValueError(f"{name} is required: {argument}")
        return value

    return _REFERENCE.sub(resolve, text)


def interpolated(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value in ``node`` interpolated (Compose leaves mapping keys alone)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(value, env) for value in node]
    return node


def load_compose(env: Mapping[str, str]) -> dict[str, Any]:
    """docker-compose.yml with its anchors merged and its variables resolved from ``env``."""
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    resolved: dict[str, Any] = interpolated(document, env)
    return resolved


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:-x}/$B/${B}", {"A": "a", "B": "b"}, "a/b/b"),
        ("${A:?say A}", {"A": "a"}, "a"),
        ("cost $$5", {}, "cost $5"),
    ],
)
def test_interpolation(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_a_missing_secret_key_stops_compose() -> None:
    with pytest.raises(ValueError, match="SECRET_KEY is required: set SECRET_KEY"):
        load_compose({})
    with pytest.raises(ValueError, match="SECRET_KEY is required"):
        load_compose({"SECRET_KEY": ""})


def test_services_wait_for_the_migration_and_restart_unless_stopped() -> None:
    services = load_compose(DOTENV)["services"]
    assert set(services) == {"postgres", "redis", *BILLING_SERVICES}
    assert services["migrate"]["restart"] == "no"
    for name in ("postgres", "redis", "api", *WORKERS, "beat"):
        assert services[name]["restart"] == "unless-stopped", name
    for name in ("api", *WORKERS, "beat"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"}
        }, name
    for name in ("postgres", "redis"):
        assert services["migrate"]["depends_on"][name] == {"condition": "service_healthy"}


def test_images_are_the_versions_the_tests_run_against() -> None:
    """The compose images pin the major versions of the servers this suite runs against."""
    services = load_compose(DOTENV)["services"]
    with psycopg.connect(
        _libpq(make_url(TEST_DATABASE_URL).set(database="postgres"))
    ) as connection:
        row = connection.execute("SHOW server_version_num").fetchone()
    assert row is not None
    assert services["postgres"]["image"] == f"postgres:{int(row[0]) // 10000}"
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    assert services["redis"]["image"] == f"redis:{version.split('.')[0]}"


# The billing services as local processes


@dataclass
class Local:
    """Where the compose services' addresses point on this machine."""

    database: URL  # a fresh database of its own on the test PostgreSQL
    redis_url: str  # the test Redis database
    directory: Path  # each service's home, /tmp and log live under it

    def home(self, name: str) -> Path:
        """The directory of service ``name`` (created): its home, and its /tmp below."""
        home = self.directory / name
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        return home

    def environment(self, name: str, service: Mapping[str, Any]) -> dict[str, str]:
        """The process environment of ``service``: its compose environment with the addresses
        mapped, plus what the image and a container of its own would provide."""
        compose: dict[str, str] = dict(service["environment"])
        database = make_url(compose["DATABASE_URL"])
        assert (database.host, database.port) == ("postgres", 5432), database
        compose["DATABASE_URL"] = database.set(
            host=self.database.host,
            port=self.database.port,
            username=self.database.username,
            password=self.database.password,
            database=self.database.database,
        ).render_as_string(hide_password=False)
        broker = urlsplit(compose["REDIS_URL"])
        assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379), broker
        compose["REDIS_URL"] = self.redis_url
        for mount, local in self.volumes(service).items():
            compose = {
                name: str(local) + value.removeprefix(mount) if value.startswith(mount) else value
                for name, value in compose.items()
            }
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home(name)),
            "DATA_DIR": str(self.home(name) / "var"),  # the image's DATA_DIR (/app/var)
        } | compose

    def volumes(self, service: Mapping[str, Any]) -> dict[str, Path]:
        """``service``'s named volumes: each mount path in the container, and the directory
        (created, one per volume, so services that share a volume share it here too)."""
        mounts = {}
        for volume in service.get("volumes", []):
            name, mount = volume.split(":")[:2]
            local = self.directory / "volumes" / name
            local.mkdir(parents=True, exist_ok=True)
            mounts[mount] = local
        return mounts

    def command(self, name: str, service: Mapping[str, Any], *, api_port: int) -> list[str]:
        """``service``'s command as it runs here: the installed executable, the API bound to a
        loopback port, the container's /tmp under this service's directory, and (for workers)
        the host name a container of its own would give the Celery node."""
        program, *args = service["command"]
        executable = shutil.which(program, path=str(BIN))
        assert executable is not None, f"{program} is not installed in {BIN}"
        tmp = self.home(name) / "tmp"
        args = [
            f"127.0.0.1:{api_port}"
            if argument == "0.0.0.0:8000"
            else re.sub(r"(^|=)/tmp/", rf"\g<1>{tmp}/", argument)
            for argument in args
        ]
        if name == "api":
            assert f"127.0.0.1:{api_port}" in args, f"the api no longer binds 0.0.0.0:8000: {args}"
        if name in WORKERS:
            args.append(f"--hostname={name}@%h")
        return [executable, *args]


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}")
        return True


def _libpq(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    """A fresh database and a flushed Redis database for the compose services; both are
    cleaned up after the test, and the processes are stopped before that."""
    test_database = make_url(TEST_DATABASE_URL)
    database = test_database.set(database=f"{test_database.database}_compose")
    _recreate_database(database.render_as_string(hide_password=False))
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    try:
        yield Local(database, TEST_REDIS_URL, tmp_path)
    finally:
        client.flushdb()
        client.close()
        maintenance = test_database.set(database="postgres")
        with psycopg.connect(_libpq(maintenance), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{database.database}" WITH (FORCE)')


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The gateway's webhook endpoint: verifies each request's signature as a gateway would."""
    running = start_receiver()
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_the_compose_services_run_the_product(local: Local, receiver: Receiver) -> None:
    services = load_compose(DOTENV)["services"]
    api_port = free_port()
    started: list[Service] = []

    def start(name: str) -> Service:
        log = local.home(name) / "output.log"
        service = Service(
            name,
            subprocess.Popen(
                local.command(name, services[name], api_port=api_port),
                cwd=local.home(name),
                env=local.environment(name, services[name]),
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
            ),
            log,
        )
        started.append(service)
        return service

    celery = Celery(broker=local.redis_url)
    try:
        migrate = start("migrate")
        with contextlib.suppress(subprocess.TimeoutExpired):
            migrate.process.wait(timeout=DEADLINE * 2)
        assert migrate.process.returncode == 0, migrate.log_text()
        assert "loaded the default price table (3 price version(s))" in migrate.log_text()

        # The API first: its four workers and the others all importing at once on two busy
        # cores can take longer than a deadline.
        running = {"api": start("api")}
        api = Api(f"http://127.0.0.1:{api_port}", running["api"].process, running["api"].log)
        wait_until(lambda: _healthy(api, running["api"]), "the api to answer", timeout=DEADLINE)
        running |= {name: start(name) for name in (*WORKERS, "beat")}
        nodes = {name: f"{name}@" for name in WORKERS}
        wait_until(
            lambda: _answering(celery, running, nodes), "the workers to answer", timeout=DEADLINE
        )
        # Each worker consumes only its own queue: a slow gateway or Stripe, or a long
        # reconciliation, cannot delay settlement.
        replies = celery.control.inspect(timeout=10, limit=len(WORKERS)).active_queues() or {}
        consumed = {
            node.split("@")[0]: sorted(queue["name"] for queue in queues)
            for node, queues in replies.items()
        }
        assert consumed == {
            "worker": ["celery"],
            "webhook-worker": ["webhooks"],
            "maintenance-worker": ["maintenance"],
        }

        # The flow, over HTTP only: an account, a key, a credit that makes the key active.
        account_id = api.create_account("compose", credit_usd=None)
        response = api.admin("POST", f"/accounts/{account_id}/keys", json={"name": "compose"})
        assert response.status_code == 201, response.text
        key = response.json()
        response = api.admin(
            "POST",
            f"/accounts/{account_id}/adjustments",
            json={"amount_usd": "0.010000000", "reason": "compose test credit"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        assert response.status_code == 201, response.text
        assert _key(api, key["id"])["state"] == "active"

        response = api.admin("POST", "/webhook-endpoints", json={"url": receiver.url})
        assert response.status_code == 201, response.text
        receiver.secret = response.json()["secret"]

        # One request: authorized with a hold, then reported at 100,000 input tokens, $0.014
        # at the shipped price of the mini model, more than the $0.01 balance.
        gateway = {"Authorization": f"Bearer {GATEWAY_TOKEN}"}
        request_id = f"req-{uuid.uuid4()}"
        response = requests.post(
            f"{api.base}/gateway/v1/authorize",
            json={
                "api_key": key["key"],
                "model": MODEL,
                "request_id": request_id,
                "input_tokens": 1000,
                "max_output_tokens": 100,
            },
            headers=gateway,
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["allow"] is True
        response = api.post_usage(
            [
                {
                    "request_id": request_id,
                    "key_id": key["id"],
                    "model": MODEL,
                    "input_tokens": 100_000,
                    "output_tokens": 100,
                }
            ]
        )
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] == 1

        wait_until(
            lambda: _key(api, key["id"])["http_status"] == 402,
            "settlement to block the key at 402",
            timeout=DEADLINE,
        )
        [change] = receiver.wait_for(
            lambda received: key_changes(received, key["id"]),
            "the signed key.state_changed webhook",
            timeout=DEADLINE,
        )
        assert (change["old_state"], change["new_state"], change["http_status"]) == (
            "active",
            "insufficient_balance",
            402,
        )
        assert all(request.error is None for request in receiver.requests())
        assert api.balance_usd(account_id) == "-0.004069000"
        # The worker counted the settlement into the shared metrics volume; the API sums it.
        metrics = requests.get(
            f"{api.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5
        )
        assert metrics.status_code == 200, metrics.text
        assert "\nbilling_usage_settled_events_total 1.0\n" in metrics.text, metrics.text
        # Beat sends its first tasks 5 seconds after it starts (long past, by now).
        wait_until(
            lambda: running["beat"].alive() and "Sending due task" in running["beat"].log_text(),
            "beat to send its first task",
            timeout=DEADLINE,
        )
    finally:
        celery.close()
        with ThreadPoolExecutor(max_workers=len(started) or 1) as stopping:
            list(stopping.map(stop, [service.process for service in started]))
        for service in started:
            print(f"--- {service.name} (exit {service.process.returncode})\n{service.log_text()}")


def _healthy(api: Api, service: Service) -> bool:
    service.alive()
    try:
        return requests.get(f"{api.base}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _answering(celery: Celery, running: dict[str, Service], nodes: dict[str, str]) -> bool:
    for name in nodes:
        running[name].alive()
    replies = celery.control.ping(timeout=0.5) or []
    answered = {node for reply in replies for node in reply}
    return all(any(node.startswith(prefix) for node in answered) for prefix in nodes.values())


def _key(api: Api, key_id: str) -> dict[str, Any]:
    response = api.admin("GET", f"/keys/{key_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
