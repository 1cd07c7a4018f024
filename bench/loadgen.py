"""The load generator of the metering benchmark: processes that post usage batches over HTTP.

Kept free of the service's imports so that its processes stay small. Bodies are generated and
serialised before the start signal, so the timed loop only sends bytes and reads the answers.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

# Canonical ids and the dotted aliases the default price table ships (both resolve to a price).
MODELS = (
    "doubao-seed-2-0-mini",
    "doubao-seed-2-0-lite",
    "doubao-seed-2-0-code",
    "doubao-seed-2.0-lite",
)
OUTCOMES = ("completed",) * 18 + ("failed", "client_disconnected")


def usage_object(rng: random.Random) -> dict[str, Any]:
    """A plausible upstream usage report, half Chat Completions, half Responses API shaped."""
    prompt = rng.randint(20, 6000)
    cached = rng.randint(0, prompt) if rng.random() < 0.3 else 0
    completion = rng.randint(1, 2500)
    reasoning = rng.randint(0, completion) if rng.random() < 0.4 else 0
    if rng.random() < 0.5:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def batch_bodies(
    prefix: str, batches: int, batch_size: int, key_ids: Sequence[str], seed: int
) -> list[bytes]:
    """``batches`` serialised ``{"events": [...]}`` bodies with unique request ids."""
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
    occurred = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    bodies = []
    for b in range(batches):
        events = [
            {
                "request_id": f"{prefix}-{b}-{i}",
                "key_id": rng.choice(key_ids),
                "model": rng.choice(MODELS),
                "usage": usage_object(rng),
                "occurred_at": occurred,
                "outcome": rng.choice(OUTCOMES),
            }
            for i in range(batch_size)
        ]
        bodies.append(json.dumps({"events": events}, separators=(",", ":")).encode())
    return bodies


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _post(session: requests.Session, url: str, body: bytes, token: str) -> tuple[int, Any]:
    response = session.post(url, data=body, headers=_headers(token), timeout=120)
    try:
        answer = response.json()
    except ValueError:
        answer = response.text[:500]
    return response.status_code, answer


def _tally(result: dict[str, Any], status: int, answer: Any) -> None:
    if status == 202 and isinstance(answer, dict):
        result["accepted"] += answer.get("accepted", 0)
        result["duplicates"] += answer.get("duplicates", 0)
        rejected = answer.get("rejected") or []
        result["rejected"] += len(rejected)
        if rejected and result["first_error"] is None:
            result["first_error"] = json.dumps(rejected[0])[:500]
    else:
        result["failed_requests"] += 1
        if result["first_error"] is None:
            result["first_error"] = f"HTTP {status}: {str(answer)[:500]}"


def _new_result() -> dict[str, Any]:
    return {
        "accepted": 0,
        "duplicates": 0,
        "rejected": 0,
        "failed_requests": 0,
        "first_error": None,
        "latencies": [],
    }


def closed_loop_sender(
    out: Any,
    start: Any,
    url: str,
    token: str,
    prefix: str,
    batches: int,
    batch_size: int,
    key_ids: Sequence[str],
    seed: int,
) -> None:
    """Post ``batches`` batches one after the other, each as soon as the previous is answered.

    Waits on the ``start`` barrier once its bodies are built; puts its result on ``out``.
    """
    result = _new_result()
    try:
        bodies = batch_bodies(prefix, batches, batch_size, key_ids, seed)
        session = requests.Session()
        _post(session, url, b"{}", token)  # open the keep-alive connection (answered 400)
        cpu0 = time.process_time()
        start.wait(timeout=120)
        result["t_first"] = time.time()
        for body in bodies:
            sent = time.perf_counter()
            status, answer = _post(session, url, body, token)
            result["latencies"].append(time.perf_counter() - sent)
            _tally(result, status, answer)
        result["t_last"] = time.time()
        result["cpu_seconds"] = time.process_time() - cpu0
    except Exception as error:  # reported to the parent, which fails the run
        result["exception"] = repr(error)
    out.put(result)


def paced_sender(
    out: Any,
    start: Any,
    url: str,
    token: str,
    prefix: str,
    batches: int,
    batch_size: int,
    interval: float,
    threads: int,
    key_ids: Sequence[str],
    seed: int,
) -> None:
    """Open-loop load: batch ``i`` is due at ``t0 + i * interval`` whatever came back before.

    A pool of ``threads`` connections sends them; a latency is measured from the moment the
    batch was due (so a late send counts against it, no coordinated omission).
    """
    result = _new_result()
    result["late_sends"] = 0
    result["max_send_delay"] = 0.0
    lock = threading.Lock()
    local = threading.local()

    def send(body: bytes, due: float) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        begun = time.perf_counter()
        status, answer = _post(local.session, url, body, token)
        done = time.perf_counter()
        with lock:
            result["latencies"].append(done - due)
            result["max_send_delay"] = max(result["max_send_delay"], begun - due)
            if begun - due > interval:
                result["late_sends"] += 1
            _tally(result, status, answer)

    try:
        bodies = batch_bodies(prefix, batches, batch_size, key_ids, seed)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            warm = [pool.submit(send_warmup, local, url, token) for _ in range(threads)]
            for future in warm:
                future.result()
            cpu0 = time.process_time()
            start.wait(timeout=120)
            result["t_first"] = time.time()
            t0 = time.perf_counter()
            futures = []
            for i, body in enumerate(bodies):
                due = t0 + i * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(send, body, due))
            for future in futures:
                future.result()
        result["t_last"] = time.time()
        result["offered_seconds"] = batches * interval
        result["cpu_seconds"] = time.process_time() - cpu0
    except Exception as error:  # reported to the parent, which fails the run
        result["exception"] = repr(error)
    out.put(result)


def send_warmup(local: threading.local, url: str, token: str) -> None:
    """Open a thread's keep-alive connection before the clock starts."""
    if not hasattr(local, "session"):
        local.session = requests.Session()
    _post(local.session, url, b"{}", token)
    time.sleep(0.05)  # let the other threads of the pool take the next warm-ups
