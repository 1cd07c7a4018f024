"""Benchmark of authorize: ``python -m bench.authorize`` (``make bench`` runs it after metering).

Real processes on this machine: gunicorn serving the API (Redis hot path, PostgreSQL behind it),
gunicorn serving ``bench.bare`` (a bare Flask endpoint reading the same JSON body) with the same
command line, a Celery worker for the overdraft phase, and ``wrk`` as the load generator.

1. Throughput: ``--connections`` keep-alive connections (wrk, 2 threads) post authorize requests
   (unique request ids, ``--keys`` keys of one funded account, each with a rate limit it never
   reaches) for ``--seconds`` per round. Bare and authorize alternate for ``--rounds`` rounds
   after a warm-up, so both see the same machine; the ratio of each round and their median are
   reported. Targets: throughput at least 0.7 of the bare endpoint's, p99 at most 1.3 times.
2. Overdraft: ``--loops`` threads each authorize, then report usage for what the request "used"
   (a random share of the output tokens its hold covers, sometimes more: an overrun), until
   authorize refuses, against one account holding $0.05; once all or nothing (``clip: false``)
   and once with holds clipped to what is available. Reported: requests allowed (and clipped),
   the final balance (checked against the exact sum of what was charged), the overdraft and the
   largest single overrun beyond a hold. Target: overdraft no more than that largest overrun.

The results replace the ``authorize`` section of BENCHMARKS.md. Every process started here is
stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis
import requests

from bench.harness.environment import (
    ADMIN_TOKEN,
    GATEWAY_TOKEN,
    recreate_database,
    service_env,
)
from bench.harness.processes import BIN, ROOT, Services, begin_run, free_port, log, tail
from bench.harness.report import mark, nproc, write_report

SECTION = "authorize"
PG = "postgres@127.0.0.1:5432"
MODEL = "doubao-seed-2-0-lite"
# Seed prices of MODEL (billing/data/prices.json), USD per token.
INPUT_PRICE = Decimal("0.39") / 1_000_000
OUTPUT_PRICE = Decimal("1.99") / 1_000_000
TARGET_RATIO = 0.7
WRK = shutil.which("wrk") or "wrk"
TARGET_P99 = 1.3
# An overdraft loop stops after this many refusals in a row, 20 ms apart.
GIVE_UP_AFTER = 50

WRK_SCRIPT = """
local counter = 0
local keys = {%(keys)s}
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  tid = tonumber(wrk.thread:get("tid"))
  prefix = args[1]
  refused = 0
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
function request()
  counter = counter + 1
  local body = '{"api_key":"' .. keys[counter %% #keys + 1] .. '","model":"%(model)s",'
    .. '"request_id":"' .. prefix .. "-" .. tid .. "-" .. counter .. '",'
    .. '"input_tokens":500,"max_output_tokens":1000}'
  return wrk.format(nil, "/gateway/v1/authorize", nil, body)
end
function response(status, headers, body)
  if status ~= 200 then refused = refused + 1 end
end
function done(summary, latency, requests)
  local refusals = 0
  for _, thread in ipairs(threads) do refusals = refusals + tonumber(thread:get("refused")) end
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %%d, "seconds": %%.3f, "p50_ms": %%.3f, "p99_ms": %%.3f, "refused": %%d,'
    .. ' "socket_errors": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, refusals,
    errors.connect + errors.read + errors.write + errors.timeout))
end
"""


@dataclass
class Config:
    seconds: int
    rounds: int
    connections: int
    workers: int
    threads: int
    keys: int
    loops: int
    database: str
    redis_url: str

    @property
    def database_url(self) -> str:
        return f"postgresql://{PG}/{self.database}"


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.authorize", description=__doc__)
    add = parser.add_argument
    add("--seconds", type=int, default=8, help="length of each measured round")
    add("--rounds", type=int, default=5, help="bare/authorize rounds, alternating")
    add("--connections", type=int, default=32)
    add("--workers", type=int, default=4, help="gunicorn worker processes (gthread)")
    add("--threads", type=int, default=4, help="threads per gunicorn worker")
    add("--keys", type=int, default=64, help="keys the authorize load spreads over")
    add("--loops", type=int, default=64, help="concurrent loops of the overdraft phase")
    add("--database", default="billing_bench_authorize")
    add("--redis-url", default="redis://127.0.0.1:6379/15")
    return Config(**vars(parser.parse_args(argv)))


class Api:
    """Admin and gateway calls to the API under test."""

    def __init__(self, base: str, gateway_token: str = GATEWAY_TOKEN) -> None:
        self.base = base
        self.gateway_token = gateway_token

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} | kwargs.pop("headers", {})
        response = requests.request(
            method, f"{self.base}/admin/v1{path}", headers=headers, timeout=30, **kwargs
        )
        response.raise_for_status()
        return response.json()

    def account(self, credit_usd: str) -> str:
        account_id: str = self.admin("POST", "/accounts", json={"name": "bench"})["id"]
        self.admin(
            "POST",
            f"/accounts/{account_id}/adjustments",
            json={"amount_usd": credit_usd, "reason": "bench credit"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        return account_id

    def key(self, account_id: str, rate_limit: str) -> str:
        created = self.admin(
            "POST", f"/accounts/{account_id}/keys", json={"name": "bench", "rate_limit": rate_limit}
        )
        secret: str = created["key"]
        return secret


def prepare(config: Config, env: dict[str, str]) -> None:
    recreate_database(PG, config.database)
    for command in (["db", "upgrade"], ["prices", "import"]):
        subprocess.run([str(BIN / "billing"), *command], env=env, check=True, cwd=ROOT)  # noqa: S603
    redis.Redis.from_url(config.redis_url).flushdb()


def serve(services: Services, name: str, app: str, config: Config) -> str:
    """Start gunicorn serving ``app``; returns its base URL once it answers."""
    port = free_port()
    services.start(
        name,
        [
            str(BIN / "gunicorn"),
            app,
            f"--bind=127.0.0.1:{port}",
            f"--workers={config.workers}",
            "--worker-class=gthread",
            f"--threads={config.threads}",
            "--no-control-socket",
            "--log-level=warning",
        ],
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        services.check()
        try:
            requests.get(f"{base}/", timeout=1)
            return base
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer") from None
            time.sleep(0.1)


def wrk(base: str, script: Path, seconds: int, connections: int, prefix: str) -> dict[str, Any]:
    output = subprocess.run(  # noqa: S603 - our own command line
        [WRK, "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), base, "--", prefix],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    result["rps"] = result["requests"] / result["seconds"]
    return result


def throughput_phase(
    config: Config, api: Api, bare: str, workdir: Path
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    account_id = api.account("1000000")
    keys = [api.key(account_id, "100000 per minute") for _ in range(config.keys)]
    token = api.admin("POST", "/gateway-tokens", json={"name": "bench"})["token"]
    script = workdir / "authorize.lua"
    script.write_text(
        WRK_SCRIPT % {"keys": ",".join(f'"{key}"' for key in keys), "token": token, "model": MODEL}
    )
    log("warm-up")
    wrk(bare, script, 3, config.connections, "warm-bare")
    wrk(api.base, script, 3, config.connections, "warm")
    rounds = []
    for number in range(config.rounds):
        plain = wrk(bare, script, config.seconds, config.connections, f"bare{number}")
        hot = wrk(api.base, script, config.seconds, config.connections, f"auth{number}")
        if hot["refused"] or hot["socket_errors"] or plain["socket_errors"]:
            raise RuntimeError(f"authorize refused or failed requests: {hot}")
        log(
            f"  round {number + 1}: bare {plain['rps']:,.0f}/s p99 {plain['p99_ms']:.1f} ms,"
            f" authorize {hot['rps']:,.0f}/s p99 {hot['p99_ms']:.1f} ms"
        )
        rounds.append((plain, hot))
    return rounds


@dataclass
class Overdraft:
    clip: bool
    allowed: int
    clipped: int
    refused: int
    final_balance: Decimal
    charged: Decimal
    largest_overrun: Decimal
    held_after: Decimal


def overdraft_phase(config: Config, api: Api, *, clip: bool) -> Overdraft:
    account_id = api.account("0.05")
    key = api.key(account_id, "100000 per minute")
    max_output = 2_000  # a whole hold: 200 input + 2000 output tokens = $0.004058
    lock = threading.Lock()
    costs: list[Decimal] = []
    overruns: list[Decimal] = []
    refusals = [0]
    clipped = [0]

    def loop(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - synthetic usage
        headers = {"Authorization": f"Bearer {api.gateway_token}"}
        refused_in_a_row = 0
        with requests.Session() as http:
            while True:
                request_id = f"od-{uuid.uuid4()}"
                answer = http.post(
                    f"{api.base}/gateway/v1/authorize",
                    json={
                        "api_key": key,
                        "model": MODEL,
                        "request_id": request_id,
                        "input_tokens": 200,
                        "max_output_tokens": max_output,
                        "clip": clip,
                    },
                    headers=headers,
                    timeout=30,
                )
                if answer.status_code == 402:
                    # Holds of requests in flight come back as their usage settles: try again,
                    # and stop once the account has stayed full for a while.
                    with lock:
                        refusals[0] += 1
                    refused_in_a_row += 1
                    if refused_in_a_row == GIVE_UP_AFTER:
                        return
                    time.sleep(0.02)
                    continue
                answer.raise_for_status()
                refused_in_a_row = 0
                granted = answer.json()
                hold = Decimal(granted["hold_usd"])
                # Most requests use part of the output their hold covers; some run past it.
                allowance = granted["max_output_tokens"]
                output = rng.randint(allowance // 4, allowance * 11 // 10)
                cost = 200 * INPUT_PRICE + output * OUTPUT_PRICE
                usage = http.post(
                    f"{api.base}/gateway/v1/usage",
                    json={
                        "request_id": request_id,
                        "api_key": key,
                        "model": MODEL,
                        "input_tokens": 200,
                        "output_tokens": output,
                    },
                    headers=headers,
                    timeout=30,
                )
                usage.raise_for_status()
                with lock:
                    costs.append(cost)
                    overruns.append(cost - hold)
                    clipped[0] += granted["clipped"]

    with ThreadPoolExecutor(config.loops) as pool:
        list(pool.map(loop, range(config.loops)))
    deadline = time.monotonic() + 60
    while True:
        account = api.admin("GET", f"/accounts/{account_id}")
        if Decimal(account["held_usd"]) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return Overdraft(
        clip=clip,
        allowed=len(costs),
        clipped=clipped[0],
        refused=refusals[0],
        final_balance=Decimal(account["balance_usd"]),
        charged=sum(costs, Decimal(0)),
        largest_overrun=max(overruns, default=Decimal(0)),
        held_after=Decimal(account["held_usd"]),
    )


def render(
    config: Config, rounds: list[tuple[dict[str, Any], dict[str, Any]]], runs: list[Overdraft]
) -> str:
    ratios = [hot["rps"] / plain["rps"] for plain, hot in rounds]
    p99s = [hot["p99_ms"] / plain["p99_ms"] for plain, hot in rounds]
    ratio, p99 = statistics.median(ratios), statistics.median(p99s)
    lines = [
        "## Authorize (`python -m bench.authorize`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on this machine"
        f" ({nproc()} cores, shared by gunicorn, Redis, PostgreSQL and wrk)."
        f" gunicorn `--workers {config.workers} --worker-class gthread --threads"
        f" {config.threads}` for both endpoints; wrk, 2 threads, {config.connections} keep-alive"
        f" connections, {config.seconds} s per round, rounds alternating after a warm-up."
        f" Authorize requests spread over {config.keys} keys of one funded account, each with a"
        " rate limit it does not reach, every request id new (each places a hold).",
        "",
        "| round | bare Flask req/s | bare p50 / p99 ms | authorize req/s |"
        " authorize p50 / p99 ms | throughput ratio | p99 ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, (plain, hot) in enumerate(rounds, 1):
        lines.append(
            f"| {number} | {plain['rps']:,.0f} | {plain['p50_ms']:.2f} / {plain['p99_ms']:.2f}"
            f" | {hot['rps']:,.0f} | {hot['p50_ms']:.2f} / {hot['p99_ms']:.2f}"
            f" | {hot['rps'] / plain['rps']:.2f} | {hot['p99_ms'] / plain['p99_ms']:.2f} |"
        )
    lines += [
        "",
        f"Median throughput ratio **{ratio:.2f}** (target >= {TARGET_RATIO}:"
        f" {mark(ratio >= TARGET_RATIO)}); median p99 ratio **{p99:.2f}** (target <="
        f" {TARGET_P99}: {mark(p99 <= TARGET_P99)}).",
        "",
        f"### Overdraft: {config.loops} concurrent authorize-then-usage loops on $0.05",
        "",
        "Each loop authorizes (200 input, 2,000 max output tokens: a whole hold of $0.004058),"
        " reports usage of a quarter to 110% of the output tokens its hold covers (so some"
        " requests overrun their hold), and retries a 402 every 20 ms until it has been refused"
        f" {GIVE_UP_AFTER} times in a row. A Celery worker settles the usage as it arrives,"
        " releasing the holds. All or nothing asks `clip: false`; clipped holds are granted the"
        " most output tokens the available balance affords, down to HOLD_MIN_OUTPUT_TOKENS.",
        "",
        "| holds | requests allowed | of which clipped | refused (402) | charged | final balance"
        " | overdraft | largest single overrun | held after settlement | exact | bounded |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for od in runs:
        lines.append(
            f"| {'clipped' if od.clip else 'all or nothing'} | {od.allowed} | {od.clipped}"
            f" | {od.refused} | ${od.charged:.9f} | ${od.final_balance:.9f}"
            f" | ${max(-od.final_balance, Decimal(0)):.9f} | ${od.largest_overrun:.9f}"
            f" | ${od.held_after:.9f} | {mark(od.final_balance == Decimal('0.05') - od.charged)}"
            f" | {mark(-od.final_balance <= max(od.largest_overrun, Decimal(0)))} |"
        )
    lines += [
        "",
        "Exact: final balance = $0.05 - charged, to the nano-dollar. Bounded: overdraft <= the"
        " largest single overrun.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    workdir = begin_run("billing-bench-authorize-")
    env = service_env(workdir, config.database_url, config.redis_url)
    services = Services(workdir, env)
    try:
        prepare(config, env)
        api = Api(serve(services, "api", "billing.wsgi:app", config))
        bare = serve(services, "bare", "bench.bare:app", config)
        log(f"throughput: {config.rounds} rounds of {config.seconds} s each, bare and authorize")
        rounds = throughput_phase(config, api, bare, workdir)
        log(f"overdraft: {config.loops} loops on $0.05")
        services.start(
            "worker",
            [str(BIN / "celery"), "-A", "workers.app", "worker", "--pool=solo", "-l", "WARNING"],
        )
        time.sleep(3)
        services.check()
        overdraft = [overdraft_phase(config, api, clip=clip) for clip in (False, True)]
    except BaseException:
        for service in services.running:
            log(f"{service.name} log:\n{tail(service.log_path)}")
        raise
    finally:
        services.stop()
    write_report(SECTION, render(config, rounds, overdraft))
    log("BENCHMARKS.md: authorize section written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
