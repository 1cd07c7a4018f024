"""Benchmark of the LiteLLM integration: ``python -m bench.litellm`` (``make bench`` runs it last).

Real processes on this machine: the billing service (gunicorn on the Redis hot path, PostgreSQL,
a Celery worker settling the usage), the fake OpenAI-compatible upstream of the tests
(``tests/integrations/litellm/upstream.py``, in a process of its own, answering at once), and two
LiteLLM proxies with the same model list on that upstream: ``plain`` (LiteLLM alone, master-key
auth) and ``billed`` (the same config plus ``billing_litellm``'s ``custom_auth`` and callbacks,
so every request is authorized, capped and its usage reported).

Each round sends ``--requests`` chat completions (non-streaming, ``max_tokens`` 64) to each proxy
from one client, one after the other, then ``--requests`` from each of ``--clients`` concurrent
clients (keep-alive connections; the billed ones spread over as many keys of one funded account).
Rounds alternate between the proxies after a warm-up, so both see the same machine. Reported:
p50 and p99 per request over all rounds, and the integration's p50 overhead against the target:
at most 5% of LiteLLM's own p50, or 3 ms, whichever is larger. Afterwards every billed request
must have been charged once.

The results replace the ``litellm`` section of BENCHMARKS.md. Every process started here is
stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import redis

from bench.harness.environment import ADMIN_TOKEN, GATEWAY_TOKEN, recreate_database, service_env
from bench.harness.processes import BIN, ROOT, Services, begin_run, free_port, log, tail
from bench.harness.report import mark, nproc, percentile, write_report
from tests.integrations.litellm.stack import (
    MASTER_KEY,
    Proxy,
    litellm_config,
    proxy_command,
    proxy_env,
)

SECTION = "litellm"
PG = "postgres@127.0.0.1:5432"
MODEL = "doubao-seed-2-0-mini"
REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a haiku about the ocean"}],
    "max_tokens": 64,
}
TARGET_SHARE, TARGET_FLOOR_MS = 0.05, 3.0
PROXY_START_SECONDS = 600


@dataclass
class Config:
    requests: int
    clients: int
    rounds: int
    warmup: int
    database: str
    redis_url: str

    @property
    def database_url(self) -> str:
        return f"postgresql://{PG}/{self.database}"


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.litellm", description=__doc__)
    add = parser.add_argument
    add("--requests", type=int, default=200, help="requests per client per round and mode")
    add("--clients", type=int, default=16, help="concurrent clients of the concurrent mode")
    add("--rounds", type=int, default=3, help="rounds, each proxy in turn")
    add("--warmup", type=int, default=50, help="requests to each proxy before measuring")
    add("--database", default="billing_bench_litellm")
    add("--redis-url", default="redis://127.0.0.1:6379/13")
    return Config(**vars(parser.parse_args(argv)))


def admin(base: str, method: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} | kwargs.pop("headers", {})
    response = httpx.request(
        method, f"{base}/admin/v1{path}", headers=headers, timeout=30, **kwargs
    )
    response.raise_for_status()
    return response.json()


def customer_keys(base: str, count: int) -> list[str]:
    """``count`` keys of one account holding $1,000, each with a rate limit it never reaches."""
    account_id = admin(base, "POST", "/accounts", json={"name": "bench"})["id"]
    admin(
        base,
        "POST",
        f"/accounts/{account_id}/adjustments",
        json={"amount_usd": "1000", "reason": "bench credit"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    body = {"name": "bench", "rate_limit": "100000 per minute"}
    return [
        admin(base, "POST", f"/accounts/{account_id}/keys", json=body)["key"] for _ in range(count)
    ]


def wait_answering(base: str, services: Services, path: str = "/healthz") -> None:
    deadline = time.monotonic() + 60
    while True:
        services.check()
        try:
            if httpx.get(base + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base} did not answer")
        time.sleep(0.1)


def send(base: str, keys: list[str], count: int) -> list[float]:
    """Latencies (ms) of ``count`` requests from each of ``len(keys)`` clients at once."""
    latencies: list[list[float]] = [[] for _ in keys]
    failures: list[str] = []
    start = threading.Barrier(len(keys))

    def client(index: int) -> None:
        headers = {"Authorization": f"Bearer {keys[index]}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            start.wait()
            for _ in range(count):
                began = time.perf_counter()
                response = http.post("/v1/chat/completions", json=REQUEST)
                latencies[index].append((time.perf_counter() - began) * 1000)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(keys))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return [value for per_client in latencies for value in per_client]


@dataclass
class Measured:
    """Latencies (ms) per proxy and mode, pooled over the rounds."""

    values: dict[tuple[str, str], list[float]]

    def p(self, proxy: str, mode: str, fraction: float) -> float:
        return percentile(self.values[(proxy, mode)], fraction)


def measure(config: Config, targets: dict[str, tuple[str, list[str]]]) -> Measured:
    values: dict[tuple[str, str], list[float]] = {}
    for base, keys in targets.values():
        send(base, keys[:1], config.warmup)
        send(base, keys, max(1, config.warmup // len(keys)))
    for number in range(config.rounds):
        order = list(targets) if number % 2 == 0 else list(reversed(targets))
        for name in order:
            base, keys = targets[name]
            sequential = send(base, keys[:1], config.requests)
            concurrent = send(base, keys, config.requests)
            values.setdefault((name, "sequential"), []).extend(sequential)
            values.setdefault((name, "concurrent"), []).extend(concurrent)
            log(
                f"  round {number + 1} {name}: sequential p50 {percentile(sequential, 0.5):.1f} ms,"
                f" {len(keys)} clients p50 {percentile(concurrent, 0.5):.1f} ms"
            )
    return Measured(values)


def charged(database_url: str) -> tuple[int, int]:
    """(usage events, of which settled) in the bench database."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'settled') FROM usage_events"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def render(
    config: Config, measured: Measured, billed_requests: int, events: tuple[int, int]
) -> str:
    lines = [
        "## LiteLLM integration overhead (`python -m bench.litellm`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this machine ({nproc()}"
        " cores, shared by both proxies, the fake upstream, the billing service, PostgreSQL, Redis"
        " and the clients). LiteLLM with `billing_litellm` against LiteLLM alone: same config,"
        " same fake upstream (answers at once), one uvicorn worker each. Non-streaming chat"
        f" completions, {config.rounds} rounds alternating after a warm-up; per round and proxy"
        f" {config.requests} requests from one client, then {config.requests} from each of"
        f" {config.clients} concurrent clients.",
        "",
        "| mode | LiteLLM p50 / p99 ms | with billing p50 / p99 ms | p50 overhead | target |  |",
        "|---|---|---|---|---|---|",
    ]
    for mode, label in (("sequential", "1 client"), ("concurrent", f"{config.clients} clients")):
        plain50, plain99 = measured.p("plain", mode, 0.5), measured.p("plain", mode, 0.99)
        billed50, billed99 = measured.p("billed", mode, 0.5), measured.p("billed", mode, 0.99)
        target = max(TARGET_SHARE * plain50, TARGET_FLOOR_MS)
        overhead = billed50 - plain50
        lines.append(
            f"| {label} | {plain50:.1f} / {plain99:.1f} | {billed50:.1f} / {billed99:.1f}"
            f" | {overhead:+.1f} ms | <= {target:.1f} ms | {mark(overhead <= target)} |"
        )
    total, settled = events
    lines += [
        "",
        f"Billed requests: {billed_requests:,}; usage events stored: {total:,}, settled:"
        f" {settled:,}: {mark(total == settled == billed_requests)} (each charged once).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    workdir = begin_run("billing-bench-litellm-")
    env = service_env(workdir, config.database_url, config.redis_url)
    services = Services(workdir, env)
    proxies = Services(
        workdir, proxy_env(url="", gateway_token=GATEWAY_TOKEN) | {"PYTHONPATH": str(ROOT)}
    )
    try:
        recreate_database(PG, config.database)
        for command in (["db", "upgrade"], ["prices", "import"]):
            subprocess.run([str(BIN / "billing"), *command], env=env, check=True, cwd=ROOT)  # noqa: S603
        redis.Redis.from_url(config.redis_url).flushdb()
        api_port, upstream_port = free_port(), free_port()
        api = f"http://127.0.0.1:{api_port}"
        services.start(
            "api",
            [
                str(BIN / "gunicorn"),
                "billing.wsgi:app",
                f"--bind=127.0.0.1:{api_port}",
                "--workers=2",
                "--worker-class=gthread",
                "--threads=8",
                "--no-control-socket",
            ],
        )
        services.start(
            "worker",
            [str(BIN / "celery"), "-A", "workers.app", "worker", "--pool=solo", "-l", "WARNING"],
        )
        proxies.env["BILLING_URL"] = api
        proxies.start(
            "upstream",
            [
                sys.executable,
                "-m",
                "tests.integrations.litellm.upstream",
                f"--port={upstream_port}",
            ],
        )
        upstream = f"http://127.0.0.1:{upstream_port}/v1"
        started: dict[str, Proxy] = {}
        for name, billing in (("plain", False), ("billed", True)):
            port = free_port()
            command = proxy_command(
                litellm_config(upstream, billing=billing), port=port, workdir=workdir, name=name
            )
            service = proxies.start(name, command)
            started[name] = Proxy(f"http://127.0.0.1:{port}", service.process, service.log_path)
        wait_answering(api, services)
        keys = customer_keys(api, config.clients)
        log("waiting for both LiteLLM proxies to start")
        for proxy in started.values():
            proxy.wait_ready(PROXY_START_SECONDS)
        targets = {
            "plain": (started["plain"].base, [MASTER_KEY] * config.clients),
            "billed": (started["billed"].base, keys),
        }
        log(f"{config.rounds} rounds of {config.requests} requests per client and mode")
        measured = measure(config, targets)
        billed_requests = sum(
            len(values) for (name, _), values in measured.values.items() if name == "billed"
        )
        billed_requests += config.warmup + max(1, config.warmup // config.clients) * config.clients
        deadline = time.monotonic() + 120
        while (events := charged(config.database_url))[1] < billed_requests:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except BaseException:
        for service in services.running + proxies.running:
            log(f"{service.name} log:\n{tail(service.log_path)}")
        raise
    finally:
        proxies.stop()
        services.stop()
    write_report(SECTION, render(config, measured, billed_requests, events))
    log("BENCHMARKS.md: litellm section written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
