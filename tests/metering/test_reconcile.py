"""The acceptance point of metering (DESIGN invariants 1, 3 and 5): a thousand random events over
several accounts, keys, models, price versions and both usage shapes are all settled; every
balance equals its ledger; every charge equals an independent recomputation done here, with
integer arithmetic from the seed prices; and `billing reconcile` says so on committed data, and
names the event when a charge is tampered with.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import Any

from click.testing import CliRunner, Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from billing.catalog import catalog
from billing.cli import main
from billing.core.db import utcnow
from billing.ledger import ledger
from billing.ledger.ledger import LedgerEntry
from billing.metering import reconcile
from billing.metering.usage_events import UsageEvent
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN, SECRET_KEY, TEST_DATABASE_URL
from tests.support import client_with

SEED = json.loads(catalog.default_price_file().read_text())
SEED_START = dt.datetime.fromisoformat(SEED["effective_from"])
CUSTOM = "acme-reconcile-1"
MODEL = "doubao-seed-2-0-lite"
CREDIT = "1000"


def nanos(usd: str) -> int:
    """Exact nano-USD of a decimal USD string."""
    value = Decimal(usd) * 10**9
    assert value == value.to_integral_value(), usd
    return int(value)


class Prices:
    """One price version as nano-USD per million tokens, cached and reasoning defaulted."""

    def __init__(
        self, input_: str, output: str, cached: str | None = None, reasoning: str | None = None
    ) -> None:
        self.input = nanos(input_)
        self.output = nanos(output)
        self.cached = nanos(cached) if cached is not None else self.input
        self.reasoning = nanos(reasoning) if reasoning is not None else self.output

    def cost(self, counts: tuple[int, int, int, int]) -> int:
        """Exact femto-USD per bucket, summed, rounded once half-up to nano-USD."""
        inp, cached, out, reasoning = counts
        femtos = (
            (inp - cached) * self.input
            + cached * self.cached
            + (out - reasoning) * self.output
            + reasoning * self.reasoning
        )
        return (femtos + 500_000) // 1_000_000


SEED_PRICES = {
    model["id"]: Prices(model["input_price_per_m"], model["output_price_per_m"])
    for model in SEED["models"]
}
# The names each seed model may be reported under: id, alias, dated snapshot.
SPELLINGS = {
    model["id"]: [model["id"], *model["aliases"], f"{model['id']}-preview-260215"]
    for model in SEED["models"]
}
FIRST_PRICES = {
    "input_price_per_m": "0.123456789",
    "cached_input_price_per_m": "0.012345678",
    "output_price_per_m": "0.987654321",
    "reasoning_price_per_m": "1.5",
}
SECOND_PRICES = {
    "input_price_per_m": "0.2",
    "cached_input_price_per_m": "0.05",
    "output_price_per_m": "1.1",
}
CUSTOM_V1 = Prices("0.123456789", "0.987654321", "0.012345678", "1.5")
CUSTOM_V2 = Prices("0.2", "1.1", "0.05")


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def create_account(admin: FlaskClient, name: str) -> str:
    response = admin.post("/admin/v1/accounts", json={"name": name})
    assert response.status_code == 201
    account_id: str = response.get_json()["id"]
    credit = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": CREDIT, "reason": "prepaid"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert credit.status_code == 201
    return account_id


def create_key(admin: FlaskClient, account_id: str) -> dict[str, Any]:
    response = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "k"})
    assert response.status_code == 201
    return response.get_json()


def add_version(admin: FlaskClient, **fields: Any) -> dict[str, Any]:
    response = admin.post("/admin/v1/models", json={"id": CUSTOM, **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["pricing"]


def random_counts(rng: random.Random) -> tuple[int, int, int, int]:
    """Token counts with every kind of subset: none, some, all; small and large."""
    inp = rng.choice([0, rng.randint(1, 50), rng.randint(1, 200_000), rng.randint(1, 5_000_000)])
    out = rng.choice([0, rng.randint(1, 50), rng.randint(1, 40_000)])
    cached = rng.choice([0, inp, rng.randint(0, inp)])
    reasoning = rng.choice([0, out, rng.randint(0, out)])
    return inp, cached, out, reasoning


def usage_fields(rng: random.Random, counts: tuple[int, int, int, int]) -> dict[str, Any]:
    """The counts as a Chat Completions usage, a Responses usage, or flat fields."""
    inp, cached, out, reasoning = counts
    shape = rng.choice(["chat", "responses", "flat"])
    if shape == "flat":
        fields = {"input_tokens": inp, "output_tokens": out}
        if cached or rng.random() < 0.5:
            fields["cached_tokens"] = cached
        if reasoning or rng.random() < 0.5:
            fields["reasoning_tokens"] = reasoning
        return fields
    names = (
        ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
        if shape == "chat"
        else ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
    )
    usage: dict[str, Any] = {names[0]: inp, names[1]: out}
    if cached or rng.random() < 0.5:
        usage[names[2]] = {"cached_tokens": cached}
    elif rng.random() < 0.5:
        usage[names[2]] = None
    if reasoning or rng.random() < 0.5:
        usage[names[3]] = {"reasoning_tokens": reasoning}
    if rng.random() < 0.5:
        usage["total_tokens"] = inp + out
    return {"usage": usage}


def test_a_thousand_random_events_settle_to_the_unit_with_zero_drift(
    admin: FlaskClient, gateway: FlaskClient, db: Session
) -> None:
    rng = random.Random(20261122)
    now = dt.datetime.now(dt.UTC)
    first_start = (now - dt.timedelta(days=20)).replace(microsecond=0)
    first = add_version(admin, effective_from=first_start.isoformat(), **FIRST_PRICES)
    second = add_version(admin, **SECOND_PRICES)  # starts now
    second_start = dt.datetime.fromisoformat(second["effective_from"])
    assert second["version_id"] != first["version_id"]

    seed_versions = {}
    for model in SEED_PRICES:
        seed_version = catalog.price_version_at(db, model, SEED_START)
        assert seed_version is not None
        seed_versions[model] = seed_version.id
    accounts = [create_account(admin, f"reconcile {n}") for n in range(4)]
    keys = [create_key(admin, account) for account in accounts for _ in range(rng.randint(1, 3))]
    assert len(keys) >= 5

    events: list[dict[str, Any]] = []
    expected: dict[str, tuple[str, int, int]] = {}  # request id -> (account, cost, version)
    sides: dict[int, int] = defaultdict(int)
    for _ in range(1000):
        key = rng.choice(keys)
        model = rng.choice([*SPELLINGS, CUSTOM])
        counts = random_counts(rng)
        event: dict[str, Any] = {
            "request_id": f"req-{uuid.uuid4()}",
            "model": model if model == CUSTOM else rng.choice(SPELLINGS[model]),
            **usage_fields(rng, counts),
        }
        if rng.random() < 0.5:
            event["api_key"] = key["key"]
        else:
            event["key_id"] = key["id"]
        if rng.random() < 0.3:
            event["outcome"] = rng.choice(["completed", "failed", "client_disconnected"])
        if model == CUSTOM:
            if rng.random() < 0.5:  # before the second version
                span = int((second_start - first_start).total_seconds()) - 2
                occurred = first_start + dt.timedelta(seconds=rng.randint(1, span))
                event["occurred_at"] = occurred.isoformat()
                prices, version = CUSTOM_V1, first["version_id"]
            else:  # after it: at receipt, or a moment after it began
                if rng.random() < 0.5:
                    occurred = second_start + dt.timedelta(seconds=rng.randint(0, 60))
                    event["occurred_at"] = occurred.isoformat()
                prices, version = CUSTOM_V2, second["version_id"]
            sides[version] += 1
        else:
            if rng.random() < 0.7:
                occurred = now - dt.timedelta(seconds=rng.randint(60, 5 * 86_400))
                event["occurred_at"] = occurred.isoformat()
            prices = SEED_PRICES[model]
            version = seed_versions[model]
        events.append(event)
        expected[event["request_id"]] = (key["account_id"], prices.cost(counts), version)
    assert sides[first["version_id"]] > 50 and sides[second["version_id"]] > 50

    for start in range(0, len(events), 250):
        response = gateway.post("/gateway/v1/usage", json={"events": events[start : start + 250]})
        assert response.status_code == 202
        answer = response.get_json()
        assert (answer["accepted"], answer["duplicates"], answer["rejected"]) == (250, 0, [])
    # A retried batch changes nothing.
    retry = gateway.post("/gateway/v1/usage", json={"events": events[250:500]})
    assert retry.status_code == 202
    assert (retry.get_json()["accepted"], retry.get_json()["duplicates"]) == (0, 250)

    db.expire_all()
    stored = {
        row.request_id: row
        for row in db.scalars(select(UsageEvent).where(UsageEvent.account_id.in_(accounts)))
    }
    assert set(stored) == set(expected)
    assert {row.status for row in stored.values()} == {"settled"}
    wrong = [
        (request_id, stored[request_id].cost_nanos, cost, stored[request_id].price_version_id)
        for request_id, (_, cost, version) in expected.items()
        if (stored[request_id].cost_nanos, stored[request_id].price_version_id) != (cost, version)
    ]
    assert wrong == []

    assert ledger.reconcile(db) == []
    assert reconcile.verify_costs(db).mismatches == []

    per_account: dict[str, int] = defaultdict(int)
    for account, cost, _ in expected.values():
        per_account[account] += cost
    assert set(per_account) <= set(accounts) and len(per_account) >= 3
    for account in accounts:
        body = admin.get(f"/admin/v1/accounts/{account}").get_json()
        assert nanos(body["balance_usd"]) == nanos(CREDIT) - per_account[account], account
        charged = db.scalar(
            select(func.sum(LedgerEntry.amount_nanos)).where(
                LedgerEntry.account_id == account, LedgerEntry.kind == "usage"
            )
        )
        assert -int(charged or 0) == per_account[account]
        [row] = admin.get(
            "/admin/v1/usage", query_string={"group_by": "account", "account_id": account}
        ).get_json()["data"]
        assert nanos(row["cost_usd"]) == per_account[account]
        assert row["requests"] == sum(1 for a, _, _ in expected.values() if a == account)


# --- the real command line on committed data -----------------------------------------------------


def run_reconcile(*options: str) -> Result:
    env = {
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": "",
        "SECRET_KEY": SECRET_KEY,
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    return CliRunner().invoke(main, ["reconcile", *options], env=env, catch_exceptions=False)


def test_billing_reconcile_passes_on_settled_usage_and_names_a_tampered_event(
    app: Flask, committed: Engine
) -> None:
    admin = client_with(app, ADMIN_TOKEN)
    gateway = client_with(app, GATEWAY_TOKEN)

    rng = random.Random(7)
    accounts = [create_account(admin, f"cli {n}") for n in range(2)]
    keys = [create_key(admin, account) for account in accounts]
    events = []
    costs: dict[str, int] = {}
    account_totals: dict[str, int] = defaultdict(int)
    for _ in range(40):
        model = rng.choice(list(SEED_PRICES))
        counts = random_counts(rng)
        key = rng.choice(keys)
        event = {
            "request_id": f"req-{uuid.uuid4()}",
            "api_key": key["key"],
            "model": rng.choice(SPELLINGS[model]),
            **usage_fields(rng, counts),
        }
        events.append(event)
        costs[event["request_id"]] = SEED_PRICES[model].cost(counts)
        account_totals[key["account_id"]] += costs[event["request_id"]]
    response = gateway.post("/gateway/v1/usage", json={"events": events})
    assert response.status_code == 202 and response.get_json()["accepted"] == 40

    with committed.connect() as connection:
        settled: dict[str, int] = dict(
            connection.execute(
                text("SELECT request_id, cost_nanos FROM usage_events WHERE status = 'settled'")
            ).all()
        )
    assert settled == costs  # committed and settled, each at its exact cost

    clean = run_reconcile()
    assert clean.exit_code == 0, clean.output
    assert clean.output.startswith("ok")

    target = max(costs, key=lambda request_id: costs[request_id])
    target_account = next(
        key["account_id"]
        for key in keys
        for event in events
        if event["request_id"] == target and event["api_key"] == key["key"]
    )
    # One batch settled everything: one usage entry per account, for all of its events.
    entry_total = account_totals[target_account]
    with committed.begin() as connection:
        connection.execute(
            text("UPDATE usage_events SET cost_nanos = cost_nanos + 1 WHERE request_id = :r"),
            {"r": target},
        )
        entry_id = connection.scalar(
            text("SELECT ledger_entry_id FROM usage_events WHERE request_id = :r"), {"r": target}
        )
    drifted = run_reconcile()
    assert drifted.exit_code == 1
    drift_lines = [line for line in drifted.output.splitlines() if line.startswith("DRIFT")]
    assert sorted(drift_lines) == sorted(
        [
            f"DRIFT event {target}: charged {costs[target] + 1},"
            f" recomputed {costs[target]} nano-USD",
            f"DRIFT ledger entry {entry_id}: charged {entry_total},"
            f" recomputed {entry_total + 1} nano-USD",
        ]
    )
    assert not drifted.output.startswith("ok")


def test_below_the_watermark_billing_reconcile_full_and_sample_find_what_the_hourly_run_skips(
    app: Flask, runtime: Runtime, committed: Engine
) -> None:
    admin = client_with(app, ADMIN_TOKEN)
    gateway = client_with(app, GATEWAY_TOKEN)
    key = create_key(admin, create_account(admin, "below"))
    reported: list[dict[str, Any]] = [
        {"usage": {"prompt_tokens": 1_000, "completion_tokens": 10}},
        {"usage": {"input_tokens": 2_000, "output_tokens": 20}},
        {"input_tokens": 3_000, "output_tokens": 30},
    ]
    events = [
        {"request_id": f"req-{uuid.uuid4()}", "key_id": key["id"], "model": MODEL, **fields}
        for fields in reported
    ]
    response = gateway.post("/gateway/v1/usage", json={"events": events})
    assert response.status_code == 202 and response.get_json()["accepted"] == 3
    first = run_reconcile("--full")
    assert first.exit_code == 0, first.output
    assert first.output.startswith("ok") and "the 3 event(s) settled ever re-priced" in first.output
    # As if an hour had passed: a clean run moves the watermark past every event.
    with runtime.transaction() as session:
        later = utcnow() + dt.timedelta(hours=1)
        assert reconcile.advance(session, reconcile.verify(session, now=later), now=later)
    target = events[1]["request_id"]
    with committed.begin() as connection:
        connection.execute(
            text("UPDATE usage_events SET cost_nanos = cost_nanos + 3 WHERE request_id = :r"),
            {"r": target},
        )

    hourly = run_reconcile()
    assert hourly.exit_code == 0, hourly.output
    assert "the 0 event(s) settled since" in hourly.output
    full = run_reconcile("--full")
    assert full.exit_code == 1
    assert f"DRIFT event {target}: charged" in full.output
    sampled = run_reconcile("--sample", "50")
    assert sampled.exit_code == 1
    drift = [line for line in sampled.output.splitlines() if line.startswith("DRIFT")]
    assert len(drift) == 1 and drift[0].startswith(f"DRIFT event {target}: charged")
