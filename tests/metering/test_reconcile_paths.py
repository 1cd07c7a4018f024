"""Reconciliation, incremental and full (DESIGN invariants 3 and 5): every kind of tampering is
found on both paths while it is above the watermark; below it, `--full` and a random sample find
it; a run re-prices only what was settled since the last clean one; the watermark moves only
after a clean run, and two runs never both move it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from billing.accounts import accounts, keys
from billing.app import create_app
from billing.catalog import catalog
from billing.core.db import utcnow
from billing.core.migrate import upgrade
from billing.core.money import parse_usd
from billing.ledger import checkpoints, ledger
from billing.ledger.ledger import EntryKind, LedgerEntry
from billing.metering import reconcile, settlement, usage_events
from billing.metering.reconcile import CostMismatch, TokenMismatch, Verification
from billing.runtime import Runtime
from tests.conftest import make_settings
from tests.metering.support import (
    CODE,
    LITE,
    MINI,
    flat,
    nanos,
    new_account,
    post,
    rid,
    seed_cost,
    stored_events,
)
from tests.support import new_key

PATHS = ["incremental", "full"]


def run(db: Session, path: str, *, now: dt.datetime | None = None) -> Verification:
    """One reconciliation on ``path``; an incremental one must start from a watermark."""
    result = reconcile.verify(db, now=now or utcnow(), full=path == "full")
    assert (result.since is None) == (path == "full")
    return result


def move_watermark(db: Session, *, now: dt.datetime) -> Verification:
    """A clean run at ``now`` that moves the watermark to CLOSE_AFTER before it."""
    result = reconcile.verify(db, now=now)
    assert result.drift == []
    assert reconcile.advance(db, result, now=now)
    assert checkpoints.verified_through(db) == now - reconcile.CLOSE_AFTER
    return result


@pytest.mark.parametrize("path", PATHS)
def test_both_paths_are_clean_and_catch_tampering(
    admin: FlaskClient, gateway: FlaskClient, db: Session, path: str
) -> None:
    move_watermark(db, now=utcnow())  # before anything below: all of it is above the watermark
    account_id = new_account(admin, "10")
    key = new_key(admin, account_id)
    chat = {
        "request_id": rid(),
        "api_key": key["key"],
        "model": LITE,
        "usage": {"prompt_tokens": 5_000, "completion_tokens": 700},
    }
    plain = flat(key, CODE, (4_000, 1_000, 300, 100))
    post(gateway, chat, plain)
    clean = run(db, path)
    assert clean.drift == []
    assert clean.costs.events == 2 and clean.costs.entries == 1
    chat_cost = seed_cost(LITE, (5_000, 0, 700, 0))
    plain_cost = seed_cost(CODE, (4_000, 1_000, 300, 100))
    entry_id = stored_events(db, chat["request_id"])[chat["request_id"]].ledger_entry_id

    def tampered(statement: str, **params: Any) -> Verification:
        savepoint = db.begin_nested()
        db.execute(text(statement), params)
        try:
            return run(db, path)
        finally:
            savepoint.rollback()

    # The stored cost: the event and its usage entry no longer agree.
    found = tampered(
        "UPDATE usage_events SET cost_nanos = cost_nanos + 1 WHERE request_id = :r",
        r=chat["request_id"],
    )
    assert found.balances == []  # the balance still equals its entries
    assert sorted(map(str, found.costs.mismatches)) == sorted(
        [
            f"event {chat['request_id']}: charged {chat_cost + 1}, recomputed {chat_cost} nano-USD",
            f"ledger entry {entry_id}: charged {chat_cost + plain_cost},"
            f" recomputed {chat_cost + plain_cost + 1} nano-USD",
        ]
    )

    # Counts changed behind the stored cost (a flat report: recomputed from the columns).
    found = tampered(
        "UPDATE usage_events SET input_tokens = input_tokens + 1 WHERE request_id = :r",
        r=plain["request_id"],
    )
    assert found.costs.mismatches == [
        CostMismatch(f"event {plain['request_id']}", plain_cost, plain_cost + 1_490)
    ]

    # The raw report changed behind the stored counts and cost.
    found = tampered(
        "UPDATE usage_events SET usage_raw = CAST(:raw AS JSON) WHERE request_id = :r",
        r=chat["request_id"],
        raw=json.dumps({"prompt_tokens": 5_000, "completion_tokens": 701}),
    )
    [tokens, cost] = found.costs.mismatches
    assert isinstance(tokens, TokenMismatch) and tokens.request_id == chat["request_id"]
    assert str(tokens) == (
        f"event {chat['request_id']}: stored tokens (input 5000, cached 0, output 700,"
        " reasoning 0), its raw usage says (input 5000, cached 0, output 701, reasoning 0)"
    )
    assert cost == CostMismatch(f"event {chat['request_id']}", chat_cost, chat_cost + 1_990)

    # The price version applied is not the one in effect: the cost alone would not show it.
    other = db.scalar(text("SELECT min(id) FROM price_versions WHERE model_id <> :m"), {"m": CODE})
    found = tampered(
        "UPDATE usage_events SET price_version_id = :v WHERE request_id = :r",
        v=other,
        r=plain["request_id"],
    )
    [mismatch] = found.costs.mismatches
    assert f"event {plain['request_id']} (price version {other}, where" in str(mismatch)

    # A balance moved without an entry.
    found = tampered(
        "UPDATE accounts SET balance_nanos = balance_nanos - 7 WHERE id = :id", id=account_id
    )
    expected_balance = nanos("10") - chat_cost - plain_cost
    assert found.costs.mismatches == []
    [drift] = found.balances
    assert (drift.account_id, drift.balance_nanos, drift.entries_nanos) == (
        account_id,
        expected_balance - 7,
        expected_balance,
    )

    assert run(db, path).drift == []  # every tampering was rolled back


# --- the incremental path, with settlement's clock chosen ----------------------------------------


def funded_key(db: Session, runtime: Runtime, *, at: dt.datetime) -> tuple[str, str]:
    """A key of a new account credited $100 at ``at``: (account id, key id)."""
    account = accounts.create_account(db, name="reconcile", email=None, now=at)
    ledger.post(
        db,
        ledger.Posting(account.id, EntryKind.ADJUSTMENT, parse_usd("100"), "credit", "test"),
        low_balance_nanos=0,
        now=at,
    )
    settings = keys.KeySettings(
        name="k", rate_limit=None, monthly_cap_nanos=None, allowed_models=None, expires_at=None
    )
    key, _ = keys.issue_key(
        db, account_id=account.id, settings=settings, hmac_key=runtime.settings.hmac_key, now=at
    )
    return account.id, key.id


def settle_at(
    db: Session, runtime: Runtime, key_ids: list[str], count: int, *, at: dt.datetime
) -> list[str]:
    """``count`` events over ``key_ids`` (both usage shapes), reported and settled at ``at``."""
    items: list[dict[str, Any]] = []
    for n in range(count):
        usage = (
            {"prompt_tokens": 1_000 + n, "completion_tokens": 50 + n}
            if n % 2
            else {"input_tokens": 900 + n, "output_tokens": 40 + n}
        )
        model = (MINI, LITE, CODE)[n % 3]
        items.append({"request_id": rid(), "key_id": key_ids[n % len(key_ids)], "model": model})
        items[-1]["usage"] = usage
    result = usage_events.ingest(
        db,
        items,
        prefix_items=True,
        hmac_key=runtime.settings.hmac_key,
        max_age=dt.timedelta(days=35),
        now=at,
    )
    assert (result.accepted, result.rejected) == (count, [])
    while settlement.settle_batch(db, low_balance_nanos=0, now=at).claimed:
        pass
    return [item["request_id"] for item in items]


def usage_entries_at(db: Session, at: dt.datetime) -> int:
    return len(
        db.scalars(
            select(LedgerEntry.id).where(
                LedgerEntry.kind == EntryKind.USAGE, LedgerEntry.created_at == at
            )
        ).all()
    )


def test_each_run_reprices_only_what_was_settled_since_the_last_clean_one(
    db: Session, runtime: Runtime
) -> None:
    start = utcnow() - dt.timedelta(hours=6)
    owners = [funded_key(db, runtime, at=start) for _ in range(3)]
    key_ids = [key_id for _, key_id in owners]
    first_at = start + dt.timedelta(minutes=1)
    settle_at(db, runtime, key_ids, 30, at=first_at)

    # The first run ever verifies the whole history.
    first = reconcile.verify(db, now=first_at + dt.timedelta(hours=1))
    assert (first.since, first.drift) == (None, [])
    assert (first.costs.events, first.costs.entries) == (30, usage_entries_at(db, first_at))
    assert reconcile.advance(db, first, now=first_at)

    # Then only what came since, however much history lies below the watermark.
    second_at = first_at + dt.timedelta(hours=1, minutes=30)
    settle_at(db, runtime, key_ids, 20, at=second_at)
    second = reconcile.verify(db, now=second_at + dt.timedelta(hours=1))
    assert second.since == first_at + dt.timedelta(minutes=50)
    assert second.drift == []
    assert (second.costs.events, second.costs.entries) == (20, usage_entries_at(db, second_at))
    assert reconcile.advance(db, second, now=second_at)

    # Nothing settled since: nothing re-priced.
    third = reconcile.verify(db, now=second_at + dt.timedelta(hours=2))
    assert (third.costs.events, third.costs.entries, third.drift) == (0, 0, [])
    assert reconcile.advance(db, third, now=second_at)

    # The checkpoints hold each account's entries before the watermark, exactly.
    for account_id, _ in owners:
        checkpoint = db.get(checkpoints.LedgerCheckpoint, account_id)
        assert checkpoint is not None
        assert checkpoint.entries_nanos == accounts.get_account(db, account_id).balance_nanos
    # And the full path still covers everything.
    full = reconcile.verify(db, now=second_at + dt.timedelta(hours=2), full=True)
    assert (full.costs.events, full.drift) == (50, [])


def test_an_event_settled_late_in_the_open_part_is_verified_again(
    db: Session, runtime: Runtime
) -> None:
    start = utcnow() - dt.timedelta(hours=3)
    _, key_id = funded_key(db, runtime, at=start)
    settle_at(db, runtime, [key_id], 5, at=start)
    # A run 5 minutes later: the events are in the open part (within CLOSE_AFTER of its clock).
    early = reconcile.verify(db, now=start + dt.timedelta(minutes=5))
    assert early.costs.events == 5
    assert reconcile.advance(db, early, now=start)
    assert checkpoints.verified_through(db) == start - dt.timedelta(minutes=5)
    later = reconcile.verify(db, now=start + dt.timedelta(hours=1))
    assert later.costs.events == 5  # re-verified, now that their window has closed


def test_tampering_below_the_watermark_is_found_by_full_and_by_a_sample(
    db: Session, runtime: Runtime
) -> None:
    start = utcnow() - dt.timedelta(hours=5)
    _, key_id = funded_key(db, runtime, at=start)
    old = settle_at(db, runtime, [key_id], 10, at=start)
    assert reconcile.advance(db, reconcile.verify(db, now=start + dt.timedelta(hours=1)), now=start)
    newer_at = start + dt.timedelta(hours=2)
    new = settle_at(db, runtime, [key_id], 4, at=newer_at)
    later = newer_at + dt.timedelta(hours=1)

    db.execute(
        text("UPDATE usage_events SET cost_nanos = cost_nanos + 5 WHERE request_id = :r"),
        {"r": old[3]},
    )
    incremental = reconcile.verify(db, now=later)
    assert incremental.costs.events == 4  # it does not read below the watermark
    assert incremental.drift == []
    full = reconcile.verify(db, now=later, full=True)
    assert [str(item).split(":")[0] for item in full.costs.mismatches] == [
        f"event {old[3]}",
        f"ledger entry {stored_events(db, old[3])[old[3]].ledger_entry_id}",
    ]
    assert not reconcile.advance(db, full, now=later)  # not clean: the watermark stays
    sampled = reconcile.verify(db, now=later, sample=1_000)
    assert sampled.sampled.events == 14  # all there are
    assert [str(item).split(":")[0] for item in sampled.sampled.mismatches] == [f"event {old[3]}"]

    # Above the watermark, both paths find it.
    db.execute(
        text("UPDATE usage_events SET cost_nanos = cost_nanos + 5 WHERE request_id = :r"),
        {"r": new[1]},
    )
    for result in (reconcile.verify(db, now=later), reconcile.verify(db, now=later, full=True)):
        assert f"event {new[1]}" in {str(item).split(":")[0] for item in result.drift}


def test_the_watermark_moves_only_after_a_clean_run_and_only_once(
    db: Session, runtime: Runtime
) -> None:
    start = utcnow() - dt.timedelta(hours=4)
    account_id, key_id = funded_key(db, runtime, at=start)
    settle_at(db, runtime, [key_id], 6, at=start)
    now = start + dt.timedelta(hours=1)
    # Two runs from the same watermark: the first to move it wins, the other changes nothing.
    one, two = reconcile.verify(db, now=now), reconcile.verify(db, now=now)
    assert reconcile.advance(db, one, now=now)
    assert not reconcile.advance(db, two, now=now)
    checkpoint = db.get(checkpoints.LedgerCheckpoint, account_id)
    assert checkpoint is not None
    assert checkpoint.entries_nanos == accounts.get_account(db, account_id).balance_nanos
    assert reconcile.verify(db, now=now + dt.timedelta(hours=1)).drift == []

    # Drift (a balance moved without an entry): the watermark stays where it is.
    settle_at(db, runtime, [key_id], 2, at=now)
    db.execute(
        text("UPDATE accounts SET balance_nanos = balance_nanos + 1 WHERE id = :id"),
        {"id": account_id},
    )
    drifted = reconcile.verify(db, now=now + dt.timedelta(hours=1))
    assert [item.account_id for item in drifted.balances] == [account_id]
    assert not reconcile.advance(db, drifted, now=now)
    assert checkpoints.verified_through(db) == now - reconcile.CLOSE_AFTER


def test_paging_through_a_window_reads_every_event_once(db: Session, runtime: Runtime) -> None:
    start = utcnow() - dt.timedelta(hours=2)
    _, key_id = funded_key(db, runtime, at=start)
    settle_at(db, runtime, [key_id], 7, at=start)  # one instant: pages split on the id
    settle_at(db, runtime, [key_id], 4, at=start + dt.timedelta(seconds=1))
    whole = reconcile.verify_costs(db)
    assert (whole.events, whole.mismatches) == (11, [])
    for page in (1, 2, 3, 7, 11):
        paged = reconcile.verify_costs(db, page=page)
        assert (paged.events, paged.entries, paged.mismatches) == (11, whole.entries, [])


def test_the_embedded_default_on_sqlite_reconciles_incrementally(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'embedded.sqlite3'}")
    upgrade(settings.sqlalchemy_url)
    app = create_app(settings)
    runtime: Runtime = app.extensions["billing"]
    with runtime.transaction() as session:
        catalog.import_prices(session, catalog.default_price_file(), now=utcnow())
        start = utcnow() - dt.timedelta(hours=3)
        _, key_id = funded_key(session, runtime, at=start)
        old = settle_at(session, runtime, [key_id], 5, at=start)
        settle_at(session, runtime, [key_id], 3, at=start + dt.timedelta(seconds=1))
    first = runtime.reconcile()
    assert (first.since, first.costs.events, first.drift, first.advanced) == (None, 8, [], True)
    with runtime.transaction() as session:
        assert reconcile.verify_costs(session, page=3).events == 8
        new = settle_at(session, runtime, [key_id], 2, at=utcnow())
        session.execute(
            text("UPDATE usage_events SET cost_nanos = cost_nanos + 1 WHERE request_id = :r"),
            {"r": old[0]},
        )
    hourly = runtime.reconcile()
    assert (hourly.costs.events, hourly.drift) == (2, [])  # the tampered event is below
    full = runtime.reconcile(full=True)
    assert f"event {old[0]}" in {str(item).split(":")[0] for item in full.drift}
    assert not full.advanced
    with runtime.transaction() as session:
        session.execute(
            text("UPDATE usage_events SET cost_nanos = cost_nanos + 1 WHERE request_id = :r"),
            {"r": new[0]},
        )
    assert f"event {new[0]}" in {str(item).split(":")[0] for item in runtime.reconcile().drift}
