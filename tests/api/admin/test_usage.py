"""GET /admin/v1/usage: settled usage totals grouped by day, model, key and account, filtered, as
JSON or CSV, always equal to the sums of the events (DESIGN 8)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.metering.usage_events import UsageEvent
from tests.metering.support import CODE, LITE, MINI, SEED_PRICES, nanos
from tests.support import assert_error

USD9 = re.compile(r"[0-9]+\.[0-9]{9}")
COUNTERS = ("requests", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")


def cost(model: str, counts: tuple[int, int, int, int]) -> int:
    """Seed prices, exact femto-USD parts, rounded once half-up (cached and reasoning at the
    input and output prices, which the seed leaves unset)."""
    input_price, output_price = SEED_PRICES[model]
    inp, cached, out, reasoning = counts
    exact = (
        (inp - cached) * input_price
        + cached * input_price
        + (out - reasoning) * output_price
        + reasoning * output_price
    )
    return (exact + 500_000) // 1_000_000


class Sent(NamedTuple):
    account: str
    key: str
    model: str
    day: str
    counts: tuple[int, int, int, int]
    cost_nanos: int


class World(NamedTuple):
    accounts: list[str]
    keys: dict[str, str]  # key id -> account id
    events: list[Sent]
    days: list[str]


def new_account(admin: FlaskClient) -> str:
    account_id: str = admin.post("/admin/v1/accounts", json={"name": "usage"}).get_json()["id"]
    response = admin.post(
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amount_usd": "1000", "reason": "test"},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201
    return account_id


def new_key(admin: FlaskClient, account_id: str) -> dict[str, Any]:
    response = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={"name": "k"})
    assert response.status_code == 201
    return response.get_json()


@pytest.fixture
def world(admin: FlaskClient, gateway: FlaskClient) -> World:
    """Two accounts, three keys, the three seed models, three UTC days, in both usage shapes."""
    now = dt.datetime.now(dt.UTC)
    today = now.date()
    days = [today - dt.timedelta(days=2), today - dt.timedelta(days=1), today]
    first, second = new_account(admin), new_account(admin)
    keys = [new_key(admin, first), new_key(admin, first), new_key(admin, second)]
    plan = [
        (0, MINI, 0, (1_000, 100, 500, 50)),
        (0, LITE, 0, (2_000, 0, 300, 0)),
        (0, LITE, 1, (3_000, 1_500, 700, 200)),
        (1, CODE, 1, (4_000, 0, 900, 600)),
        (0, MINI, 2, (5_000, 4_000, 100, 0)),
        (1, LITE, 2, (6_000, 0, 1_100, 1_000)),
        (2, CODE, 0, (7_000, 3_500, 1_300, 100)),
        (2, MINI, 1, (8_000, 0, 1_500, 0)),
        (2, CODE, 2, (9_000, 9_000, 1_700, 1_700)),
        (1, MINI, 0, (10_000, 10, 1_900, 19)),
        (0, CODE, 2, (11_000, 0, 2_100, 0)),
    ]
    names = {MINI: "doubao-seed-2.0-mini", LITE: LITE, CODE: "doubao-seed-2-0-code-preview-260215"}
    bodies, sent = [], []
    for index, (key_index, model, day_index, counts) in enumerate(plan):
        key = keys[key_index]
        inp, cached, out, reasoning = counts
        body: dict[str, Any] = {
            "request_id": f"req-{uuid.uuid4()}",
            "key_id": key["id"],
            "model": names[model] if index % 2 else model,
        }
        if day_index < 2:
            noon = dt.datetime.combine(days[day_index], dt.time(12), tzinfo=dt.UTC)
            body["occurred_at"] = noon.isoformat()
        if index % 3 == 0:
            body["usage"] = {
                "prompt_tokens": inp,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens": out,
                "completion_tokens_details": {"reasoning_tokens": reasoning},
            }
        elif index % 3 == 1:
            body["usage"] = {
                "input_tokens": inp,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": inp + out,
            }
        else:
            body |= dict(
                zip(
                    ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"),
                    counts,
                    strict=True,
                )
            )
        bodies.append(body)
        sent.append(
            Sent(
                key["account_id"],
                key["id"],
                model,
                days[day_index].isoformat(),
                counts,
                cost(model, counts),
            )
        )
    # An unpriced event is not settled usage: it must not appear in any report.
    bodies.append(
        {
            "request_id": f"req-{uuid.uuid4()}",
            "key_id": keys[0]["id"],
            "model": "acme-unpriced",
            "input_tokens": 999,
            "output_tokens": 999,
        }
    )
    response = gateway.post("/gateway/v1/usage", json={"events": bodies})
    assert response.status_code == 202
    assert (response.get_json()["accepted"], response.get_json()["rejected"]) == (len(bodies), [])
    return World(
        [first, second],
        {key["id"]: key["account_id"] for key in keys},
        sent,
        [day.isoformat() for day in days],
    )


FIELD = {"day": "day", "model": "model", "key": "key", "account": "account"}


def expected(
    events: Iterable[Sent], group_by: tuple[str, ...]
) -> dict[tuple[str, ...], dict[str, Any]]:
    """The report as it must be: sums of the events per group, money as 9-place strings."""
    totals: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0] * 6)
    for event in events:
        values = {
            "day": event.day,
            "model": event.model,
            "key": event.key,
            "account": event.account,
        }
        row = totals[tuple(values[name] for name in group_by)]
        row[0] += 1
        for position, count in enumerate(event.counts, start=1):
            row[position] += count
        row[5] += event.cost_nanos
    return {
        group: {
            **dict(zip(COUNTERS, row[:5], strict=True)),
            "cost_usd": f"{row[5] // 10**9}.{row[5] % 10**9:09d}",
        }
        for group, row in totals.items()
    }


def report(admin: FlaskClient, **query: Any) -> list[dict[str, Any]]:
    response = admin.get("/admin/v1/usage", query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["object"] == "list"
    group_by = [part for part in query.get("group_by", "day").split(",") if part]
    assert body["group_by"] == group_by
    for row in body["data"]:
        assert isinstance(row["cost_usd"], str) and USD9.fullmatch(row["cost_usd"]), row
        assert set(row) == {*group_by, *COUNTERS, "cost_usd"}
    return body["data"]


def keyed(rows: list[dict[str, Any]], group_by: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
    result = {}
    for row in rows:
        group = tuple(row[name] for name in group_by)
        assert group not in result, f"{group} twice"
        result[group] = {name: row[name] for name in (*COUNTERS, "cost_usd")}
    return result


@pytest.mark.parametrize(
    "group_by",
    [
        ("day",),
        ("model",),
        ("key",),
        ("account",),
        ("day", "model"),
        ("model", "key"),
        ("account", "day"),
        ("day", "model", "key", "account"),
    ],
)
def test_every_grouping_equals_the_sums_of_the_events(
    admin: FlaskClient, world: World, group_by: tuple[str, ...]
) -> None:
    mine = set(world.accounts)
    for account in world.accounts:
        rows = report(admin, group_by=",".join(group_by), account_id=account)
        events = [event for event in world.events if event.account == account]
        assert keyed(rows, group_by) == expected(events, group_by)
        groups = [tuple(row[name] for name in group_by) for row in rows]
        assert groups == sorted(groups)  # ordered by the groups
    # Without a filter the report may also hold other accounts: look at the rows of ours.
    if "account" in group_by or "key" in group_by:
        every = report(admin, group_by=",".join(group_by))
        ours = [
            row
            for row in every
            if row.get("account") in mine or world.keys.get(row.get("key", "")) in mine
        ]
        assert keyed(ours, group_by) == expected(world.events, group_by)


def test_the_grand_total_is_the_sum_of_every_event(admin: FlaskClient, world: World) -> None:
    for account in world.accounts:
        [row] = report(admin, group_by="account", account_id=account)
        events = [event for event in world.events if event.account == account]
        assert row["requests"] == len(events)
        assert nanos(row["cost_usd"]) == sum(event.cost_nanos for event in events)
        assert row["input_tokens"] == sum(event.counts[0] for event in events)
        assert row["reasoning_tokens"] == sum(event.counts[3] for event in events)
        # And the report's money is what the account was charged.
        account_body = admin.get(f"/admin/v1/accounts/{account}").get_json()
        assert nanos("1000") - nanos(account_body["balance_usd"]) == nanos(row["cost_usd"])


def test_the_report_equals_the_settled_events_in_the_database(
    admin: FlaskClient, world: World, db: Session
) -> None:
    db.expire_all()
    for account in world.accounts:
        settled = db.execute(
            select(func.count(), func.sum(UsageEvent.cost_nanos)).where(
                UsageEvent.account_id == account, UsageEvent.status == "settled"
            )
        ).one()
        [row] = report(admin, group_by="account", account_id=account)
        assert settled[1] is not None
        assert (row["requests"], nanos(row["cost_usd"])) == (settled[0], int(settled[1]))


def test_models_are_reported_by_id_whatever_spelling_was_reported(
    admin: FlaskClient, world: World
) -> None:
    first = world.accounts[0]
    rows = report(admin, group_by="model", account_id=first)
    assert {row["model"] for row in rows} == {MINI, LITE, CODE}
    assert "acme-unpriced" not in {row["model"] for row in report(admin, group_by="model")}


def test_filters_by_key_and_model(admin: FlaskClient, world: World) -> None:
    for key, account in world.keys.items():
        rows = report(admin, group_by="day", key_id=key)
        events = [event for event in world.events if event.key == key]
        assert keyed(rows, ("day",)) == expected(events, ("day",))
        assert all(event.account == account for event in events)
    for model in (MINI, LITE, CODE):
        first = world.accounts[0]
        rows = report(admin, group_by="key", model=model, account_id=first)
        events = [e for e in world.events if e.model == model and e.account == first]
        assert keyed(rows, ("key",)) == expected(events, ("key",))
    key = next(iter(world.keys))
    rows = report(admin, group_by="model", key_id=key, model=LITE)
    events = [e for e in world.events if e.key == key and e.model == LITE]
    assert keyed(rows, ("model",)) == expected(events, ("model",))
    assert report(admin, account_id="acct_nobody") == []
    assert report(admin, key_id="key_nobody") == []
    assert report(admin, model="acme-unpriced") == []


def test_from_and_to_are_inclusive_utc_days(admin: FlaskClient, world: World) -> None:
    first = world.accounts[0]
    day0, day1, day2 = world.days
    mine = [event for event in world.events if event.account == first]
    for start, end, days in (
        (day1, day1, {day1}),
        (day0, day1, {day0, day1}),
        (day1, day2, {day1, day2}),
        (day0, day2, {day0, day1, day2}),
        (day2, None, {day2}),
        (None, day0, {day0}),
        (None, None, {day0, day1, day2}),
    ):
        query = {"group_by": "day,model", "account_id": first}
        if start:
            query["from"] = start
        if end:
            query["to"] = end
        rows = report(admin, **query)
        events = [event for event in mine if event.day in days]
        assert keyed(rows, ("day", "model")) == expected(events, ("day", "model")), query
        assert {row["day"] for row in rows} == days
    before = (dt.date.fromisoformat(day0) - dt.timedelta(days=1)).isoformat()
    assert report(admin, account_id=first, to=before) == []


def test_csv_has_a_header_row_and_the_same_numbers(admin: FlaskClient, world: World) -> None:
    first = world.accounts[0]
    query = {"group_by": "day,model", "account_id": first}
    as_json = report(admin, **query)
    response = admin.get("/admin/v1/usage", query_string={**query, "format": "csv"})
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    lines = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert lines[0] == [
        "day",
        "model",
        "requests",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_usd",
    ]
    assert len(lines) == len(as_json) + 1
    for line, row in zip(lines[1:], as_json, strict=True):
        assert line == [
            row["day"],
            row["model"],
            *(str(row[name]) for name in COUNTERS),
            row["cost_usd"],
        ]
        assert USD9.fullmatch(line[-1])
    events = [event for event in world.events if event.account == first]
    assert sum(nanos(line[-1]) for line in lines[1:]) == sum(e.cost_nanos for e in events)
    assert sum(int(line[2]) for line in lines[1:]) == len(events)


def test_csv_of_an_empty_report_is_just_the_header(admin: FlaskClient, db: Session) -> None:
    response = admin.get(
        "/admin/v1/usage",
        query_string={"group_by": "key", "account_id": "acct_nobody", "format": "csv"},
    )
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert list(csv.reader(io.StringIO(response.get_data(as_text=True)))) == [
        ["key", *COUNTERS, "cost_usd"]
    ]


@pytest.mark.parametrize("group_by", ["week", "day,hour", "Day", "", ",", "model;key"])
def test_a_bad_group_by_is_refused_naming_it(
    admin: FlaskClient, db: Session, group_by: str
) -> None:
    response = admin.get("/admin/v1/usage", query_string={"group_by": group_by})
    assert_error(response, 400, "invalid_request", "group_by")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"from": "2026-11-02", "to": "2026-11-01"}, "from"),
        ({"from": "2026-13-01"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"format": "xml"}, "format"),
    ],
)
def test_bad_dates_and_formats_are_refused(
    admin: FlaskClient, db: Session, query: dict[str, str], param: str
) -> None:
    assert_error(admin.get("/admin/v1/usage", query_string=query), 400, "invalid_request", param)
    csv_query = {**query, "format": "csv"} if param != "format" else query
    assert_error(
        admin.get("/admin/v1/usage", query_string=csv_query), 400, "invalid_request", param
    )


def test_one_event_shows_its_price_and_exact_breakdown(
    admin: FlaskClient, gateway: FlaskClient
) -> None:
    key = new_key(admin, new_account(admin))
    # Seed 002's usage at lite's price: uncached 88 * 0.39 = 34.32, output 19 * 1.99 = 37.81,
    # reasoning 211 * 1.99 = 419.89 micro-USD; total 492.02 micro-USD.
    usage = {
        "input_tokens": 88,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 230,
        "output_tokens_details": {"reasoning_tokens": 211},
        "total_tokens": 318,
    }
    body = {"request_id": "req-breakdown", "api_key": key["key"], "model": LITE, "usage": usage}
    assert gateway.post("/gateway/v1/usage", json=body).status_code == 202

    event = admin.get("/admin/v1/usage/events/req-breakdown").get_json()
    assert (event["status"], event["model_id"], event["cost_usd"]) == (
        "settled",
        LITE,
        "0.000492020",
    )
    assert event["breakdown"] == {
        "input_usd": "0.000034320",
        "cached_usd": "0.000000000",
        "output_usd": "0.000037810",
        "reasoning_usd": "0.000419890",
        "total_usd": "0.000492020",
    }
    assert (event["input_tokens"], event["output_tokens"], event["reasoning_tokens"]) == (
        88,
        230,
        211,
    )
    assert event["ledger_entry_id"] is not None
    assert_error(admin.get("/admin/v1/usage/events/req-unknown"), 404, "not_found", "request_id")
