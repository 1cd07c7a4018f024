"""The plans PostgreSQL chooses for the usage report queries and the monthly spend of capped
keys, on the bench's data (EXPLAIN, not run), printed with the results: a report that reads the
whole history instead of its period shows here as a sequential scan."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import Session

from bench.metering.config import Config

Plans = list[tuple[str, list[str]]]


def report_plans(session: Session, *, today: dt.date, key_ids: list[str]) -> Plans:
    """(what, plan) of each report query over the last 7 days, and of the monthly spend of
    ``key_ids``; the per-account report is that of the first key's account."""
    from billing.accounts import rollups
    from billing.accounts.keys import ApiKey
    from billing.core.db import explain

    start = today - dt.timedelta(days=6)
    account_id = session.get_one(ApiKey, key_ids[0]).account_id
    now = dt.datetime.combine(today, dt.time(12), dt.UTC)
    queries: list[tuple[str, Any]] = [
        (
            f"all accounts, group_by={','.join(groups)}{suffix}, last 7 days",
            rollups.report_statement(rollups.UsageQuery(group_by=groups, start=start, end=today)),
        )
        for groups, suffix in [
            (("day",), ""),
            (("model",), ""),
            (("key",), ""),
            (("day", "account"), " (also the CSV by day and account)"),
        ]
    ]
    queries.append(
        (
            "one account, group_by=day, last 7 days",
            rollups.report_statement(
                rollups.UsageQuery(account_id=account_id, group_by=("day",), start=start, end=today)
            ),
        )
    )
    queries.append(
        (
            f"monthly spend of {len(key_ids)} capped keys (settlement's cap check, authorize"
            " without Redis)",
            rollups.month_spend_statement(key_ids, now=now),
        )
    )
    return [(what, explain(session, statement)) for what, statement in queries]


def collect(config: Config, key_ids: list[str]) -> Plans:
    """:func:`report_plans` on the bench's database, today."""
    from billing.core.db import make_engine, utcnow

    engine = make_engine(config.sqlalchemy_url)
    try:
        with Session(engine) as session:
            return report_plans(session, today=utcnow().date(), key_ids=key_ids)
    finally:
        engine.dispose()


def render_plans(plans: Plans) -> list[str]:
    """The plans as a section of the results."""
    lines = [
        "Report queries as PostgreSQL plans them on this run's data (`EXPLAIN`, not run;"
        " `bench/metering/plans.py`). On a history, reports over all accounts read their"
        " period through `ix_usage_rollups_day` and monthly spend one row per key by primary"
        " key (`tests/accounts/test_report_plans.py` checks it on a year of rollups); on this"
        " run's small tables a sequential scan may be the cheaper plan, and then it is the one"
        " shown.",
        "",
    ]
    for what, plan in plans:
        lines += [f"- {what}:", "", "  ```", *(f"  {line}" for line in plan), "  ```", ""]
    return lines
