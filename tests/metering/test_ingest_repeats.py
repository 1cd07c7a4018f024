"""Request ids repeated within one usage report and against the stored event (issue 10,
observation 12): every item is judged against the stored event, or, when its request id is new,
against the first item that carries it; the same content (as resolved: the model behind an
alias, the instant whatever the offset, the counts whatever the usage shape) is a duplicate,
other content a conflict. Money is charged once whatever is repeated."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from tests.metering.support import (
    LITE,
    balance,
    count,
    counts,
    event,
    funded_key,
    report,
    seed_cost,
    stored_events,
)
from tests.support import assert_error

LITE_ALIAS = "doubao-seed-2.0-lite"
LITE_SNAPSHOT = "doubao-seed-2-0-lite-preview-260215"  # a dated snapshot of LITE


def an_hour_ago() -> dt.datetime:
    return (utcnow() - dt.timedelta(hours=1)).replace(microsecond=0)


def z(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def answer_of(report_answer: dict[str, Any]) -> tuple[int, int, list[tuple[int, str]]]:
    """(accepted, duplicates, [(index, error code)]) of a report's answer."""
    rejected = [(item["index"], item["error"]["code"]) for item in report_answer["rejected"]]
    return report_answer["accepted"], report_answer["duplicates"], rejected


def conflicts_are_named(report_answer: dict[str, Any], request_id: str) -> None:
    for item in report_answer["rejected"]:
        index = item["index"]
        assert item["request_id"] == request_id
        assert item["error"]["param"] == f"events[{index}].request_id"
        assert f"events[{index}].request_id" in item["error"]["message"]


@pytest.fixture
def key(admin: FlaskClient) -> dict[str, Any]:
    return funded_key(admin, credit="10")


# --- with the event stored -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        ("changed first", (0, 1, [(0, "request_id_conflict")])),
        ("same first", (0, 1, [(1, "request_id_conflict")])),
    ],
)
def test_with_a_stored_the_same_is_a_duplicate_and_a_change_a_conflict_in_either_order(
    admin: FlaskClient,
    gateway: FlaskClient,
    db: Session,
    key: dict[str, Any],
    order: str,
    expected: tuple[int, int, list[tuple[int, str]]],
) -> None:
    stored = event(key, occurred_at=z(an_hour_ago()))
    assert report(gateway, stored)["accepted"] == 1
    charged = balance(admin, key["account_id"])
    before = count(db)

    changed = {**stored, "output_tokens": 201}
    items = [changed, stored] if order == "changed first" else [stored, changed]
    answer = report(gateway, {"events": items})
    assert answer_of(answer) == expected
    conflicts_are_named(answer, stored["request_id"])

    assert count(db) == before
    row = stored_events(db, stored["request_id"])[stored["request_id"]]
    assert counts(row) == (1000, 0, 200, 0)  # the stored event stands
    assert balance(admin, key["account_id"]) == charged


def test_with_b_stored_a_changed_b_sent_twice_is_two_conflicts(
    admin: FlaskClient, gateway: FlaskClient, db: Session, key: dict[str, Any]
) -> None:
    stored = event(key, occurred_at=z(an_hour_ago()))
    assert report(gateway, stored)["accepted"] == 1
    charged = balance(admin, key["account_id"])

    changed = {**stored, "input_tokens": 999}
    answer = report(gateway, {"events": [changed, dict(changed)]})
    assert answer_of(answer) == (
        0,
        0,
        [(0, "request_id_conflict"), (1, "request_id_conflict")],
    )
    conflicts_are_named(answer, stored["request_id"])
    row = stored_events(db, stored["request_id"])[stored["request_id"]]
    assert counts(row) == (1000, 0, 200, 0)
    assert balance(admin, key["account_id"]) == charged


# --- a new request id, repeated within the report ------------------------------------------------


def test_a_new_event_sent_twice_is_accepted_once_and_then_a_duplicate(
    admin: FlaskClient, gateway: FlaskClient, db: Session, key: dict[str, Any]
) -> None:
    before, funds = count(db), balance(admin, key["account_id"])
    new = event(key, occurred_at=z(an_hour_ago()))
    assert answer_of(report(gateway, {"events": [new, dict(new)]})) == (1, 1, [])
    assert count(db) == before + 1
    assert balance(admin, key["account_id"]) == funds - seed_cost(LITE, (1000, 0, 200, 0))


def test_a_new_event_then_a_changed_one_is_accepted_and_a_conflict(
    admin: FlaskClient, gateway: FlaskClient, db: Session, key: dict[str, Any]
) -> None:
    before, funds = count(db), balance(admin, key["account_id"])
    new = event(key, occurred_at=z(an_hour_ago()))
    changed = {**new, "outcome": "failed"}
    answer = report(gateway, {"events": [new, changed, dict(new)]})
    assert answer_of(answer) == (1, 1, [(1, "request_id_conflict")])
    conflicts_are_named(answer, new["request_id"])
    assert count(db) == before + 1
    row = stored_events(db, new["request_id"])[new["request_id"]]
    assert row.outcome == "completed"  # the first item is the one stored
    assert balance(admin, key["account_id"]) == funds - seed_cost(LITE, (1000, 0, 200, 0))


# --- content compared as resolved, not as spelled ------------------------------------------------


def same_content_respelled(key: dict[str, Any], moment: dt.datetime) -> list[dict[str, Any]]:
    """One event (LITE, 1200 in of which 1000 cached, 300 out of which 120 reasoning), spelled
    every way that resolves to the same content."""
    counts_fields = {
        "input_tokens": 1200,
        "cached_tokens": 1000,
        "output_tokens": 300,
        "reasoning_tokens": 120,
    }
    chat = {
        "prompt_tokens": 1200,
        "prompt_tokens_details": {"cached_tokens": 1000},
        "completion_tokens": 300,
        "completion_tokens_details": {"reasoning_tokens": 120},
        "total_tokens": 1500,
    }
    responses = {
        "input_tokens": 1200,
        "input_tokens_details": {"cached_tokens": 1000},
        "output_tokens": 300,
        "output_tokens_details": {"reasoning_tokens": 120},
        "total_tokens": 1500,
    }
    plain: dict[str, Any] = {
        "request_id": f"req-respelled-{key['id']}",
        "api_key": key["key"],
        "model": LITE,
        "occurred_at": z(moment),
        **counts_fields,
    }
    without_counts = {k: v for k, v in plain.items() if k not in counts_fields}
    in_paris = moment.astimezone(dt.timezone(dt.timedelta(hours=1))).isoformat()
    return [
        plain,
        {**plain, "model": LITE_ALIAS},
        {**plain, "model": LITE_SNAPSHOT},
        {**plain, "occurred_at": in_paris},
        {**without_counts, "usage": chat},
        {**without_counts, "usage": responses, "model": LITE_ALIAS, "occurred_at": in_paris},
        {**plain, "api_key": None, "key_id": key["id"]},
        {**plain, "outcome": "completed"},
    ]


def without_none(item: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in item.items() if value is not None}


@pytest.mark.parametrize("first", range(3), ids=["by id", "by alias", "by snapshot"])
def test_a_respelling_of_a_stored_event_is_a_duplicate(
    admin: FlaskClient, gateway: FlaskClient, db: Session, key: dict[str, Any], first: int
) -> None:
    spellings = [without_none(item) for item in same_content_respelled(key, an_hour_ago())]
    stored = spellings.pop(first)
    assert report(gateway, stored)["accepted"] == 1
    charged, before = balance(admin, key["account_id"]), count(db)

    for spelling in spellings:  # one at a time, as retries come
        assert answer_of(report(gateway, spelling)) == (0, 1, []), spelling
    assert answer_of(report(gateway, {"events": spellings})) == (0, len(spellings), [])
    assert count(db) == before
    assert balance(admin, key["account_id"]) == charged


def test_respellings_of_a_new_event_within_one_report_are_duplicates(
    admin: FlaskClient, gateway: FlaskClient, db: Session, key: dict[str, Any]
) -> None:
    spellings = [without_none(item) for item in same_content_respelled(key, an_hour_ago())]
    funds, before = balance(admin, key["account_id"]), count(db)
    answer = report(gateway, {"events": [spellings[1], *spellings]})
    assert answer_of(answer) == (1, len(spellings), [])
    assert count(db) == before + 1
    row = stored_events(db, spellings[0]["request_id"])[spellings[0]["request_id"]]
    assert row.model == LITE_ALIAS  # stored as the first item spelled it
    assert counts(row) == (1200, 1000, 300, 120)
    assert balance(admin, key["account_id"]) == funds - seed_cost(LITE, (1200, 1000, 300, 120))


def test_another_model_or_instant_is_still_a_conflict(
    gateway: FlaskClient, key: dict[str, Any]
) -> None:
    moment = an_hour_ago()
    stored = event(key, occurred_at=z(moment))
    assert report(gateway, stored)["accepted"] == 1
    for change in (
        {"model": "doubao-seed-2.0-mini"},  # an alias, of another model
        {"model": "doubao-seed-2-0-lite-extended"},  # no model at all
        {"occurred_at": (moment + dt.timedelta(seconds=1)).isoformat()},
        {"occurred_at": moment.replace(tzinfo=dt.timezone(dt.timedelta(hours=1))).isoformat()},
    ):
        assert_error(
            gateway.post("/gateway/v1/usage", json={**stored, **change}),
            409,
            "request_id_conflict",
            "request_id",
        )


def test_a_model_named_by_an_alias_added_later_is_still_the_same_event(
    admin: FlaskClient, gateway: FlaskClient, key: dict[str, Any]
) -> None:
    """An event reported under a name no model had yet is the event of the model the name
    resolves to now."""
    name = f"acme-lite-{key['id'][-8:].lower()}"
    stored = event(key, model=name, occurred_at=z(an_hour_ago()))
    assert report(gateway, stored)["accepted"] == 1
    assert answer_of(report(gateway, stored)) == (0, 1, [])
    assert_error(
        gateway.post("/gateway/v1/usage", json={**stored, "model": LITE}),
        409,
        "request_id_conflict",
    )

    added = admin.post(f"/admin/v1/models/{LITE}/aliases", json={"alias": name})
    assert added.status_code == 201, added.get_json()
    assert answer_of(report(gateway, {**stored, "model": LITE})) == (0, 1, [])
    assert answer_of(report(gateway, {**stored, "model": LITE_ALIAS})) == (0, 1, [])
    assert answer_of(report(gateway, stored)) == (0, 1, [])
