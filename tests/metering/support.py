"""Helpers of the metering tests: accounts and keys over the admin API, usage reported to the
gateway, the stored events read back, and the money they should cost.

Expected money is computed here from the seed price file with integer arithmetic: a price in
nano-USD per million tokens times a token count is femto-USD; an event's parts are summed and
rounded once, half-up, to nano-USD.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from decimal import Decimal
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.catalog import catalog
from billing.metering.usage_events import UsageEvent
from tests.support import new_key

USAGE = "/gateway/v1/usage"
USD9 = re.compile(r"-?[0-9]+\.[0-9]{9}")
SEED = json.loads(catalog.default_price_file().read_text())
SEED_START = dt.datetime.fromisoformat(SEED["effective_from"])

# Seed 002's Responses API usage, and the same numbers in the Chat Completions shape.
RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 88,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 230,
    "output_tokens_details": {"reasoning_tokens": 211},
    "total_tokens": 318,
}
CHAT_USAGE: dict[str, Any] = {
    "prompt_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 1000},
    "completion_tokens": 300,
    "completion_tokens_details": {"reasoning_tokens": 120},
    "total_tokens": 1500,
}


def nanos(usd: str) -> int:
    """Exact nano-USD of a decimal USD string (refusing anything finer than a nano)."""
    value = Decimal(usd) * 10**9
    assert value == value.to_integral_value(), usd
    return int(value)


# nano-USD per million tokens, straight from the seed file: (input, output).
SEED_PRICES = {
    model["id"]: (nanos(model["input_price_per_m"]), nanos(model["output_price_per_m"]))
    for model in SEED["models"]
}
MINI, LITE, CODE = "doubao-seed-2-0-mini", "doubao-seed-2-0-lite", "doubao-seed-2-0-code"


def femtos(
    counts: tuple[int, int, int, int],
    input_price: int,
    output_price: int,
    cached_price: int | None = None,
    reasoning_price: int | None = None,
) -> tuple[int, int, int, int]:
    """The exact priced parts (input, cached, output, reasoning) in femto-USD."""
    inp, cached, out, reasoning = counts
    return (
        (inp - cached) * input_price,
        cached * (input_price if cached_price is None else cached_price),
        (out - reasoning) * output_price,
        reasoning * (output_price if reasoning_price is None else reasoning_price),
    )


def rounded(parts: tuple[int, ...]) -> int:
    """Femto-USD to nano-USD, half-up, once."""
    return (sum(parts) + 500_000) // 1_000_000


def seed_cost(model: str, counts: tuple[int, int, int, int]) -> int:
    return rounded(femtos(counts, *SEED_PRICES[model]))


def new_account(admin: FlaskClient, credit: str = "0") -> str:
    account_id: str = admin.post("/admin/v1/accounts", json={"name": "metered"}).get_json()["id"]
    if Decimal(credit):
        adjust(admin, account_id, credit)
    return account_id


def adjust(admin: FlaskClient, account_id: str, amount: str) -> None:
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": amount, "reason": "test"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.get_json()


def funded_key(admin: FlaskClient, credit: str = "100") -> dict[str, Any]:
    """A key (with ``key`` and ``id``) of a fresh account credited with ``credit`` USD."""
    return new_key(admin, new_account(admin, credit))


def balance(admin: FlaskClient, account_id: str) -> int:
    body = admin.get(f"/admin/v1/accounts/{account_id}").get_json()
    assert USD9.fullmatch(body["balance_usd"]), body
    return nanos(body["balance_usd"])


def add_version(admin: FlaskClient, model_id: str, **fields: Any) -> dict[str, Any]:
    response = admin.post("/admin/v1/models", json={"id": model_id, **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def seed_version_id(db: Session, model: str) -> int:
    version = catalog.price_version_at(db, model, SEED_START)
    assert version is not None and version.effective_from == SEED_START
    return version.id


def rid() -> str:
    return f"req-{uuid.uuid4()}"


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


def flat(
    key: dict[str, Any], model: str, counts: tuple[int, int, int, int], **fields: Any
) -> dict[str, Any]:
    inp, cached, out, reasoning = counts
    return {
        "request_id": rid(),
        "api_key": key["key"],
        "model": model,
        "input_tokens": inp,
        "cached_tokens": cached,
        "output_tokens": out,
        "reasoning_tokens": reasoning,
        **fields,
    }


def event(key: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A valid flat-count event for ``key``; ``fields`` override or add to it."""
    base: dict[str, Any] = {
        "request_id": rid(),
        "api_key": key["key"],
        "model": "doubao-seed-2-0-lite",
        "input_tokens": 1000,
        "output_tokens": 200,
    }
    base.update(fields)
    return {name: value for name, value in base.items() if value is not ...}


def post(gateway: FlaskClient, *events: dict[str, Any]) -> None:
    body = events[0] if len(events) == 1 else {"events": list(events)}
    response = gateway.post(USAGE, json=body)
    assert response.status_code == 202, response.get_json()
    answer = response.get_json()
    assert (answer["accepted"], answer["rejected"]) == (len(events), []), answer


def report(gateway: FlaskClient, body: Any) -> dict[str, Any]:
    response = gateway.post(USAGE, json=body)
    assert response.status_code == 202, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["object"] == "usage_report"
    assert set(answer) == {"object", "accepted", "duplicates", "rejected"}
    return answer


def stored_events(db: Session, *request_ids: str) -> dict[str, UsageEvent]:
    db.expire_all()
    found = db.scalars(select(UsageEvent).where(UsageEvent.request_id.in_(request_ids)))
    return {row.request_id: row for row in found}


def count(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(UsageEvent)) or 0


def counts(row: UsageEvent) -> tuple[int, int, int, int]:
    return (row.input_tokens, row.cached_tokens, row.output_tokens, row.reasoning_tokens)


def usage_entries(admin: FlaskClient, account_id: str) -> list[dict[str, Any]]:
    response = admin.get(f"/admin/v1/accounts/{account_id}/ledger", query_string={"limit": 100})
    assert response.status_code == 200
    return [entry for entry in response.get_json()["data"] if entry["kind"] == "usage"]
