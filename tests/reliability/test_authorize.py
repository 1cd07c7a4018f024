"""Authorize under real concurrency: 32 threads against a real gunicorn (two processes of four
threads) with Redis, holds settled by a real Celery worker (DESIGN invariant 4)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import requests
from sqlalchemy import Engine

from tests.conftest import GATEWAY_TOKEN
from tests.reliability.conftest import Api, Workers, wait_until

MODEL = "doubao-seed-2-0-lite"
OUTPUT_PRICE = Decimal("1.99") / 1_000_000  # USD per output token (seed price list)
INPUT_PRICE = Decimal("0.39") / 1_000_000
THREADS = 32
PER_THREAD = 4
MAX_OUTPUT = 2_000  # each hold: $0.00398; $0.05 fits 12 of them


def test_holds_granted_to_32_threads_never_exceed_the_balance_and_settle_exactly(
    committed: Engine, api: Api, workers: Workers
) -> None:
    account_id = api.create_account("contended", credit_usd="0.05")
    created = api.admin(
        "POST", f"/accounts/{account_id}/keys", json={"name": "busy", "rate_limit": "1000/second"}
    )
    secret = created.json()["key"]
    key_id = created.json()["id"]

    def authorize(_: int) -> list[tuple[str, requests.Response]]:
        answers = []
        with requests.Session() as http:
            for _ in range(PER_THREAD):
                request_id = f"req-{uuid.uuid4()}"
                answers.append(
                    (
                        request_id,
                        http.post(
                            f"{api.base}/gateway/v1/authorize",
                            json={
                                "api_key": secret,
                                "model": MODEL,
                                "request_id": request_id,
                                "max_output_tokens": MAX_OUTPUT,
                                # All or nothing, so that the count of whole holds is exact
                                # (tests/enforcement/test_overdraft.py covers clipped holds).
                                "clip": False,
                            },
                            headers={"Authorization": f"Bearer {GATEWAY_TOKEN}"},
                            timeout=30,
                        ),
                    )
                )
        return answers

    with ThreadPoolExecutor(THREADS) as pool:
        answers = [answer for batch in pool.map(authorize, range(THREADS)) for answer in batch]

    statuses = sorted({response.status_code for _, response in answers})
    assert statuses == [200, 402], [response.text for _, response in answers][:3]
    allowed = [(rid, response.json()) for rid, response in answers if response.status_code == 200]
    held = sum(Decimal(body["hold_usd"]) for _, body in allowed)
    assert held <= Decimal("0.05")
    assert len(allowed) == 12  # every hold that fitted was granted, and no more
    account = api.admin("GET", f"/accounts/{account_id}").json()
    assert Decimal(account["held_usd"]) == held

    # Each allowed request reports what it used; the worker settles and releases the holds.
    workers.start(1)
    charged = Decimal(0)
    events: list[dict[str, Any]] = []
    for index, (request_id, _) in enumerate(allowed):
        output_tokens = 100 * (index + 1)
        charged += 50 * INPUT_PRICE + output_tokens * OUTPUT_PRICE
        events.append(
            {
                "request_id": request_id,
                "key_id": key_id,
                "model": MODEL,
                "input_tokens": 50,
                "output_tokens": output_tokens,
            }
        )
    assert api.post_usage(events).status_code == 202

    def settled() -> bool:
        body = api.admin("GET", f"/accounts/{account_id}").json()
        return Decimal(body["held_usd"]) == 0

    wait_until(settled, "the holds to be released by settlement")
    account = api.admin("GET", f"/accounts/{account_id}").json()
    assert Decimal(account["balance_usd"]) == Decimal("0.05") - charged
    assert Decimal(account["available_usd"]) == Decimal(account["balance_usd"])
