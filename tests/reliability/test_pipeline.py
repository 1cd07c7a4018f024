"""The usage-metering pipeline under failure, with real processes (DESIGN 6.2 and 7).

The API is a real gunicorn reached over HTTP, settlement runs in real ``celery worker``
processes over the real Redis broker, and the outcome is read from PostgreSQL. What these tests
hold the pipeline to: an event answered 202 is never lost and never charged twice, whatever is
retried or killed (invariants 1, 5 and 6), and settlement moves key states at once. Redis flushed
and PostgreSQL cut off are in test_outages.py.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
import redis
import requests
from celery import Celery
from sqlalchemy import Engine

from billing.metering.settlement import BATCH_SIZE
from tests.reliability.conftest import (
    BROKERS,
    Api,
    Worker,
    Workers,
    cost_nanos,
    recent,
    rows,
    scalar,
    status_counts,
    usage_event,
    wait_until,
)
from tests.reliability.support import (
    SETTLE,
    SWEEP,
    assert_settled_exactly_once,
    ingest,
    wait_settled,
)
from tests.support import mirrored_state

# The tests that say most about a broker (a worker killed holding a task, two workers sharing a
# backlog) run on each; the others on Redis only, to keep the suite short.
on_both_brokers = pytest.mark.parametrize("broker", BROKERS, indirect=True, scope="module")


def nanos(usd: str) -> int:
    """A decimal USD string of the API as nano-dollars (parsed here, not by billing)."""
    return int(Decimal(usd) * 1_000_000_000)


def backlog(
    api: Api, accounts: int, keys_per_account: int, events: int, tag: str
) -> list[dict[str, Any]]:
    """Funded accounts with keys, and ``events`` distinct events spread over their keys."""
    keys = []
    for number in range(accounts):
        account_id = api.create_account(f"{tag}-{number}", credit_usd="1000")
        keys += [api.create_key(account_id, f"k{k}") for k in range(keys_per_account)]
    at = recent()
    return [
        usage_event(f"{tag}-{uuid.uuid4().hex}", keys[n % len(keys)], 100 + n % 977, n % 101, at)
        for n in range(events)
    ]


def first_row(engine: Engine, sql: str, **params: Any) -> Any:
    found = rows(engine, sql, **params)
    return found[0] if found else None


def backend(engine: Engine, pid: int) -> Any:
    """A PostgreSQL backend's state, xid and last query, or None once it has ended."""
    return first_row(
        engine,
        "SELECT state, backend_xid::text::bigint AS xid, query FROM pg_stat_activity"
        " WHERE pid = :pid",
        pid=pid,
    )


def freeze_inside_batch(engine: Engine, worker: Worker) -> Any:
    """Stop ``worker`` (SIGSTOP) inside a settlement transaction; its backend's (pid, xid).

    Caught once some batches have committed and some events still wait, in a transaction that
    has claimed its batch and begun writing it (its last statement an INSERT or UPDATE: ledger
    entries, balances, the events' status) and has not committed: frozen, the worker can
    neither commit nor go on. If it had already sent its COMMIT when it was stopped, it is let
    go on and caught in a later batch.
    """
    for _attempt in range(20):
        found = wait_until(
            lambda: first_row(
                engine,
                """
                SELECT pid, backend_xid::text::bigint AS xid FROM pg_stat_activity
                WHERE application_name = :name AND backend_xid IS NOT NULL
                  AND state IN ('active', 'idle in transaction')
                  AND query ~* '^\\s*(insert|update)'
                  AND EXISTS (SELECT 1 FROM usage_events WHERE status = 'settled')
                  AND EXISTS (SELECT 1 FROM usage_events WHERE status = 'pending')
                """,
                name=worker.application_name,
            ),
            "the worker to be inside a batch",
            every=0.002,
        )
        worker.process.send_signal(signal.SIGSTOP)
        # Whatever the backend was doing completes, or blocks writing a result to the frozen
        # worker; a COMMIT already sent completes too, and ends the transaction (xid gone).
        time.sleep(0.2)
        seen = [backend(engine, found.pid)]
        time.sleep(0.05)
        seen.append(backend(engine, found.pid))
        if all(
            now is not None
            and now.xid == found.xid
            and now.state in ("active", "idle in transaction")
            and not now.query.lstrip().upper().startswith("COMMIT")
            for now in seen
        ):
            return found
        worker.process.send_signal(signal.SIGCONT)
    pytest.fail("could not catch the worker inside a batch")


def post_concurrently(api: Api, batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Post each batch from its own thread, all released at once; the 202 bodies in order."""
    barrier = threading.Barrier(len(batches), timeout=10)
    answers: list[requests.Response | None] = [None] * len(batches)

    def deliver(number: int) -> None:
        with requests.Session() as session:
            barrier.wait()
            answers[number] = api.post_usage(batches[number], session=session)

    threads = [threading.Thread(target=deliver, args=(number,)) for number in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    bodies = []
    for answer in answers:
        assert answer is not None, "a delivery did not finish"
        assert answer.status_code == 202, answer.text
        bodies.append(answer.json())
    return bodies


def test_one_event_delivered_three_times_concurrently_is_stored_and_charged_once(
    api: Api, workers: Workers, committed: Engine
) -> None:
    """Three threads post batches that all hold the same event (in six rounds): one answer
    accepts it, the two others count it a duplicate; one row, one charge."""
    account_id = api.create_account("duplicates", credit_usd="100")
    key_id = api.create_key(account_id)
    workers.start()
    at, tag = recent(), uuid.uuid4().hex
    distinct: dict[str, dict[str, Any]] = {}
    shared_ids = []
    for round_ in range(6):
        shared = usage_event(f"{tag}-shared-{round_}", key_id, 1000 + round_, 7 + round_, at)
        shared_ids.append(shared["request_id"])
        batches = []
        for thread in range(3):
            others = [
                usage_event(f"{tag}-{round_}-{thread}-{n}", key_id, 10 + n, thread + 1, at)
                for n in range(40)
            ]
            others.insert(thread * 15 + round_, shared)  # a different place in each batch
            batches.append(others)
        for batch in batches:
            distinct.update((event["request_id"], event) for event in batch)
        bodies = post_concurrently(api, batches)
        assert all(body["rejected"] == [] for body in bodies)
        # 41 items each: 40 of its own, always accepted, and the shared one.
        assert sorted((body["accepted"], body["duplicates"]) for body in bodies) == [
            (40, 1),
            (40, 1),
            (41, 0),
        ], bodies

    wait_settled(committed, len(distinct))
    for request_id in shared_ids:
        assert (
            scalar(
                committed, "SELECT count(*) FROM usage_events WHERE request_id = :r", r=request_id
            )
            == 1
        )
    expected = sum(cost_nanos(event) for event in distinct.values())
    assert nanos("100") - nanos(api.balance_usd(account_id)) == expected
    assert scalar(committed, "SELECT sum(cost_nanos) FROM usage_events") == expected
    assert_settled_exactly_once(committed, set(distinct))


@on_both_brokers
def test_worker_killed_mid_batch_leaves_nothing_lost_or_charged_twice(
    api: Api, workers: Workers, committed: Engine, celery_client: Celery
) -> None:
    """SIGKILL a worker frozen inside a batch that has written to the ledger: that transaction
    aborts, and a new worker settles every event exactly once."""
    events = backlog(api, accounts=3, keys_per_account=2, events=20_000, tag="kill")
    ingest(api, events)  # no worker runs yet: all 20,000 wait, pending
    assert status_counts(committed) == {"pending": 20_000}

    celery_client.control.purge()  # the API's triggers: settlement starts when we say
    (victim,) = workers.start()
    celery_client.send_task(SETTLE)
    frozen = freeze_inside_batch(committed, victim)
    settled_at_kill = status_counts(committed)["settled"]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    wait_until(lambda: backend(committed, frozen.pid) is None, "the killed worker's backend to end")
    assert (
        scalar(
            committed,
            "SELECT pg_xact_status(((pg_current_xact_id()::text::bigint >> 32) * 4294967296"
            " + :xid)::text::xid8)",
            xid=frozen.xid,
        )
        == "aborted"
    ), "the batch in flight was rolled back"
    assert status_counts(committed)["settled"] == settled_at_kill
    assert 0 < settled_at_kill < 20_000

    workers.start()
    celery_client.send_task(SWEEP)  # as beat would: the killed task's message is unacked
    wait_settled(committed, 20_000, celery_client)
    assert_settled_exactly_once(committed, {event["request_id"] for event in events})


@on_both_brokers
def test_two_workers_drain_a_backlog_together_without_overlap_or_gaps(
    api: Api, workers: Workers, committed: Engine, celery_client: Celery
) -> None:
    """Two workers drain one backlog side by side (SKIP LOCKED): none twice, none skipped."""
    total = 10_000
    events = backlog(api, accounts=2, keys_per_account=2, events=total, tag="pair")
    ingest(api, events)
    celery_client.control.purge()  # the API's triggers: the two tasks below replace them
    first, second = workers.start(2)
    celery_client.send_task(SETTLE)
    celery_client.send_task(SETTLE)
    wait_settled(committed, total)

    assert_settled_exactly_once(committed, {event["request_id"] for event in events})
    references = rows(
        committed, "SELECT DISTINCT reference FROM ledger_entries WHERE kind = 'usage'"
    )
    assert all(row.reference.startswith("settlement:") for row in references)
    # One entry per account per batch, at most BATCH_SIZE events a batch.
    batches = scalar(
        committed,
        "SELECT count(DISTINCT reference) FROM ledger_entries WHERE kind = 'usage'",
    )
    assert batches >= total // BATCH_SIZE

    # Each worker logs what each settle task claimed: both did part of the work, and together
    # exactly all of it (a helper task that found nothing left returns 0).
    def claimed() -> tuple[list[int], list[int]] | None:
        results = first.task_results(SETTLE), second.task_results(SETTLE)
        return results if sum(map(sum, results)) == total else None

    by_first, by_second = wait_until(claimed, "both workers to log their settle results")
    assert sum(by_first) > 0 and sum(by_second) > 0, (by_first, by_second)


def test_account_at_zero_shows_its_keys_at_402_within_a_second_of_settlement(
    api: Api, workers: Workers, committed: Engine, redis_client: redis.Redis
) -> None:
    """Usage that takes an account to zero: its keys read 402 in the admin API and in the
    Redis mirror within a second of the event's settled_at."""
    # $0.001 = 1,000,000 nano-dollars; the two events below cost 440,000 and 560,000.
    account_id = api.create_account("runs-dry", credit_usd="0.001")
    keys = [api.create_key(account_id, f"k{n}") for n in range(2)]
    workers.start()
    at, tag = recent(), uuid.uuid4().hex
    first = usage_event(f"{tag}-1", keys[0], 3133, 2, at)
    last = usage_event(f"{tag}-2", keys[1], 4000, 0, at)
    assert (cost_nanos(first), cost_nanos(last)) == (440_000, 560_000)

    ingest(api, [first])
    wait_settled(committed, 1)
    assert api.balance_usd(account_id) == "0.000560000"
    for key_id in keys:
        assert api.admin("GET", f"/keys/{key_id}").json()["state"] == "active"
        assert mirrored_state(redis_client, key_id)["state"] == "active"

    def admin_402() -> bool:
        return all(
            (body := api.admin("GET", f"/keys/{key_id}").json())["state"] == "insufficient_balance"
            and body["http_status"] == 402
            for key_id in keys
        )

    def mirror_402() -> bool:
        mirrored = [mirrored_state(redis_client, key_id) for key_id in keys]
        return all(
            (state.get("state"), state.get("http_status")) == ("insufficient_balance", "402")
            for state in mirrored
        )

    seen: dict[str, float] = {}

    def both_seen() -> bool:
        for name, check in (("mirror", mirror_402), ("admin", admin_402)):
            if name not in seen and check():
                seen[name] = time.time()
        return len(seen) == 2

    ingest(api, [last])
    wait_until(both_seen, "the keys at 402", every=0.01)
    settled_at = scalar(
        committed, "SELECT settled_at FROM usage_events WHERE request_id = :r", r=last["request_id"]
    )
    assert settled_at is not None
    for name, moment in seen.items():
        lag = moment - settled_at.timestamp()
        assert lag < 1.0, f"{name} showed 402 {lag:.3f}s after settlement"
    assert api.balance_usd(account_id) == "0.000000000"
    for key_id in keys:  # and it was settlement that moved them
        assert [
            tuple(change)
            for change in rows(
                committed,
                "SELECT new_state, reason FROM key_state_changes WHERE key_id = :k"
                " ORDER BY id DESC LIMIT 1",
                k=key_id,
            )
        ] == [("insufficient_balance", "usage settled")]
