"""Clipped holds under concurrency (issue #12; DESIGN invariant 4): 64 loops authorize and
report usage against one account holding $0.05 until nothing more fits, on PostgreSQL and on
Redis. The clip is computed where the hold is reserved, atomically, so:

- when every request uses all the output its hold covers (the worst case a hold exists for),
  the balance never goes below zero, and the account is spent down to less than the smallest
  hold a request accepts;
- when requests may run past their holds, the overdraft is no more than what they cost beyond
  them (``make bench`` measures the same, as the overdraft of its clipping-on phase).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from flask import Flask
from sqlalchemy import Engine

from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN
from tests.enforcement.support import LITE, LITE_INPUT, LITE_OUTPUT, MILLION, new_account
from tests.support import client_with, new_key

LOOPS = 64
CREDIT = Decimal("0.05")
INPUT_TOKENS = 200
MAX_OUTPUT = 2_000  # a whole hold: $0.004058, so about 12 fit; clipping serves more
MIN_OUTPUT = 256  # HOLD_MIN_OUTPUT_TOKENS
# A loop stops after this many refusals in a row, 20 ms apart (holds come back as usage
# settles, so a refusal is not the end until the account has stayed full for a while).
GIVE_UP_AFTER = 30


def cost(output_tokens: int) -> Decimal:
    return (INPUT_TOKENS * LITE_INPUT + output_tokens * LITE_OUTPUT) / MILLION


@dataclass
class Run:
    lock: threading.Lock = field(default_factory=threading.Lock)
    charged: Decimal = Decimal(0)
    overruns: Decimal = Decimal(0)
    allowed: int = 0
    clipped: int = 0


def spend_down(flask_app: Flask, key: str, *, overrun: bool) -> Run:
    """64 loops: authorize, then report usage for the granted output (or up to 10% more)."""
    run = Run()

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        gateway = client_with(flask_app, GATEWAY_TOKEN)
        refused_in_a_row = 0
        while refused_in_a_row < GIVE_UP_AFTER:
            request_id = f"od-{uuid.uuid4()}"
            answer = gateway.post(
                "/gateway/v1/authorize",
                json={
                    "api_key": key,
                    "model": LITE,
                    "request_id": request_id,
                    "input_tokens": INPUT_TOKENS,
                    "max_output_tokens": MAX_OUTPUT,
                },
            )
            if answer.status_code == 402:
                refused_in_a_row += 1
                time.sleep(0.02)
                continue
            assert answer.status_code == 200, answer.get_data(as_text=True)
            refused_in_a_row = 0
            body = answer.get_json()
            granted = body["max_output_tokens"]
            used = rng.randint(granted * 9 // 10, granted * 11 // 10) if overrun else granted
            usage = gateway.post(
                "/gateway/v1/usage",
                json={
                    "request_id": request_id,
                    "api_key": key,
                    "model": LITE,
                    "input_tokens": INPUT_TOKENS,
                    "output_tokens": used,
                },
            )
            assert usage.status_code == 202, usage.get_data(as_text=True)
            with run.lock:
                run.allowed += 1
                run.clipped += body["clipped"]
                run.charged += cost(used)
                run.overruns += max(Decimal(0), cost(used) - Decimal(body["hold_usd"]))

    with ThreadPoolExecutor(LOOPS) as pool:
        list(pool.map(loop, range(LOOPS)))
    return run


def settling(runtime: Runtime, done: threading.Event) -> threading.Thread:
    """What a worker does with Redis: settle pending usage as it comes."""

    def settle() -> None:
        while not done.is_set():
            runtime.settle_pending()
            time.sleep(0.02)

    thread = threading.Thread(target=settle, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("overrun", [False, True], ids=["exact", "overrun"])
@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_64_loops_with_clipping_on_never_overdraw_beyond_overruns(
    committed: Engine, app: Flask, redis_app: Flask, backend: str, overrun: bool
) -> None:
    flask_app = redis_app if backend == "redis" else app
    runtime: Runtime = flask_app.extensions["billing"]
    admin = client_with(flask_app, ADMIN_TOKEN)
    account_id = new_account(admin, str(CREDIT))
    key = new_key(admin, account_id, rate_limit="100000 per minute")["key"]
    done = threading.Event()
    settler = settling(runtime, done) if backend == "redis" else None
    try:
        run = spend_down(flask_app, key, overrun=overrun)
    finally:
        done.set()
        if settler is not None:
            settler.join()
    runtime.settle_pending()
    account = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    balance = Decimal(account["balance_usd"])

    assert Decimal(account["held_usd"]) == 0
    assert balance == CREDIT - run.charged  # every request charged once, exactly
    assert run.allowed > 12 and run.clipped > 0  # clipping served more than whole holds fit
    assert -balance <= run.overruns  # never overdrawn beyond what requests ran past holds
    if not overrun:
        assert run.overruns == 0
        assert Decimal(0) <= balance < cost(MIN_OUTPUT)
