"""The usage-metering pipeline through outages, with real processes (DESIGN 6.2 and 7): Redis
flushed mid-run loses no accepted event and the key-state mirror is rebuilt from PostgreSQL;
PostgreSQL cut off answers an OpenAI-shaped 503, records nothing, and recovers."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from pathlib import Path

import redis
import requests
from celery import Celery
from sqlalchemy import Engine

from billing.app import create_app
from billing.core.settings import Settings
from billing.enforcement import mirror
from tests.conftest import TEST_DATABASE_URL, make_settings, worker_env
from tests.reliability.conftest import (
    Api,
    Workers,
    recent,
    rows,
    scalar,
    start_api,
    status_counts,
    stop,
    usage_event,
    wait_until,
)
from tests.reliability.faults import RedisServer, TcpProxy
from tests.reliability.support import (
    SWEEP,
    assert_settled_exactly_once,
    ingest,
    wait_settled,
)
from tests.support import mirrored_state


def test_redis_flushed_mid_run_loses_no_event_and_the_mirror_is_rebuilt(
    api: Api,
    workers: Workers,
    committed: Engine,
    celery_client: Celery,
    redis_client: redis.Redis,
) -> None:
    """FLUSHDB while usage streams in and settles: every accepted event settles, and the
    key-state mirror is rebuilt from PostgreSQL."""
    funded = api.create_account("flush-funded", credit_usd="1000")
    keys = [api.create_key(funded, f"k{n}") for n in range(2)]
    revoked = api.create_key(funded, "revoked")
    assert api.admin("POST", f"/keys/{revoked}/revoke").status_code == 200
    broke = api.create_key(api.create_account("flush-broke", credit_usd=None), "broke")
    workers.start()
    celery_client.send_task(SWEEP)  # beat runs all along

    at, tag = recent(), uuid.uuid4().hex
    accepted: set[str] = set()
    failures: list[str] = []
    posted = threading.Semaphore(0)
    halt = threading.Event()

    def post_continuously() -> None:
        deadline = time.monotonic() + 40
        with requests.Session() as session:
            for number in range(200):
                if halt.is_set() or time.monotonic() > deadline:
                    return
                batch = [
                    usage_event(f"{tag}-{number}-{n}", keys[n % 2], 50 + n, number % 9, at)
                    for n in range(100)
                ]
                try:
                    response = api.post_usage(batch, session=session)
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                else:
                    if response.status_code != 202 or response.json()["accepted"] != len(batch):
                        failures.append(f"{response.status_code} {response.text}")
                    else:
                        accepted.update(event["request_id"] for event in batch)
                posted.release()
                time.sleep(0.02)

    poster = threading.Thread(target=post_continuously)
    poster.start()
    try:
        for _ in range(5):
            assert posted.acquire(timeout=30)
        wait_until(
            lambda: status_counts(committed).get("settled", 0) > 0, "settlement to be running"
        )
        redis_client.flushdb()
        assert redis_client.get(mirror.CURSOR) is None
        for _ in range(10):
            assert posted.acquire(timeout=30)
    finally:
        halt.set()
        poster.join(timeout=30)
    assert failures == []

    celery_client.send_task(SWEEP)  # as beat would: the broker's queue went with the flush
    wait_settled(committed, len(accepted), celery_client)
    assert_settled_exactly_once(committed, accepted)

    wait_until(lambda: redis_client.get(mirror.CURSOR) is not None, "the mirror cursor")
    states = dict(rows(committed, "SELECT id, state FROM api_keys"))
    expected = {
        keys[0]: "active",
        keys[1]: "active",
        revoked: "revoked",
        broke: "insufficient_balance",
    }
    assert states == expected
    http = {"active": "200", "revoked": "401", "insufficient_balance": "402"}
    for key_id, state in expected.items():
        mirrored = mirrored_state(redis_client, key_id)
        assert (mirrored.get("state"), mirrored.get("http_status")) == (state, http[state])


def test_postgres_unreachable_answers_503_and_recovers(
    redis_settings: Settings, committed: Engine, pg_proxy: TcpProxy, tmp_path: Path
) -> None:
    """PostgreSQL cut off behind a proxy: usage reports get an OpenAI-shaped 503 (never a 500)
    and record nothing; once it is back, the same report is accepted."""
    host = f"127.0.0.1:{pg_proxy.port}"
    proxied_url = TEST_DATABASE_URL.replace("127.0.0.1:5432", host)
    assert host in proxied_url, "TEST_DATABASE_URL must name 127.0.0.1:5432"
    server = start_api(
        worker_env(redis_settings) | {"DATABASE_URL": proxied_url},
        tmp_path / "gunicorn.log",
        workers=2,
        threads=2,
    )
    try:
        account_id = server.create_account("outage", credit_usd="10")
        key_id = server.create_key(account_id)
        at, tag = recent(), uuid.uuid4().hex
        before = [usage_event(f"{tag}-a{n}", key_id, 100, 10, at) for n in range(20)]
        during = [usage_event(f"{tag}-b{n}", key_id, 100, 10, at) for n in range(20)]
        ingest(server, before)
        assert pg_proxy.open_connections > 0

        pg_proxy.stop()
        for _ in range(6):  # enough to reach both gunicorn workers
            response = server.post_usage(during)
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "service_unavailable"
            assert error["type"] == "server_error"
            assert set(error) == {"message", "type", "param", "code"}
        assert server.admin("GET", f"/accounts/{account_id}").status_code == 503

        pg_proxy.start()
        response = server.post_usage(during)
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] == len(during), "a 503 recorded nothing"
        for _ in range(4):  # both gunicorn workers are back
            response = server.post_usage(before)
            assert response.status_code == 202, response.text
            assert response.json()["duplicates"] == len(before)
        assert server.balance_usd(account_id) == "10.000000000"
    finally:
        stop(server.process)
    log = server.log.read_text()
    assert "database unavailable" in log
    assert "unhandled error" not in log and "Traceback" not in log, log


def test_a_worker_rides_out_a_redis_restart_and_settles_what_follows(
    committed: Engine, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis (broker, mirror and all) restarted without persistence while a worker settles a
    stream of usage: the worker stays up, reconnects by itself, and events reported once Redis
    is back settle within 10 s of it; every accepted event settles exactly once."""
    settings = make_settings(tmp_path / "data", redis_url=own_redis.url)
    celery: Celery = create_app(settings).extensions["celery"]
    server = start_api(worker_env(settings), tmp_path / "gunicorn.log", workers=2, threads=2)
    pool = Workers(settings, celery, tmp_path)
    try:
        account_id = server.create_account("restart", credit_usd="1000")
        keys = [server.create_key(account_id, f"k{n}") for n in range(2)]
        (worker,) = pool.start(as_in_production=True)

        at, tag = recent(), uuid.uuid4().hex
        accepted: dict[str, float] = {}  # request id -> when its 202 came
        halt = threading.Event()

        def post_continuously() -> None:
            with requests.Session() as session:
                for number in itertools.count():
                    if halt.is_set():
                        return
                    batch = [
                        usage_event(f"{tag}-{number}-{n}", keys[n % 2], 50 + n, number % 9, at)
                        for n in range(50)
                    ]
                    response = server.post_usage(batch, session=session)
                    assert response.status_code == 202, response.text
                    answered = time.monotonic()
                    accepted.update((event["request_id"], answered) for event in batch)
                    time.sleep(0.05)

        poster = threading.Thread(target=post_continuously)
        poster.start()
        try:
            wait_until(lambda: status_counts(committed).get("settled", 0) > 0, "settlement to run")
            own_redis.stop()
            wait_until(
                lambda: "Connection to broker lost" in worker.log_text(),
                "the worker to notice Redis is gone",
            )
            own_redis.start()
            back = time.monotonic()

            def settled_after_restart() -> bool:
                after = [rid for rid, answered in list(accepted.items()) if answered > back]
                return bool(after) and scalar(
                    committed,
                    "SELECT count(*) FROM usage_events"
                    " WHERE request_id = ANY(:ids) AND status = 'settled'",
                    ids=after,
                ) == len(after)

            wait_until(settled_after_restart, "events reported after the restart to settle")
            recovered_in = time.monotonic() - back
        finally:
            halt.set()
            poster.join(timeout=30)
        assert not poster.is_alive()
        assert recovered_in < 10, f"settlement resumed {recovered_in:.1f}s after Redis was back"
        wait_settled(committed, len(accepted), celery)
        assert_settled_exactly_once(committed, set(accepted))
        assert worker.process.poll() is None, worker.log_text()
        assert "Unrecoverable error" not in worker.log_text()
    finally:
        pool.stop_all()
        stop(server.process)
