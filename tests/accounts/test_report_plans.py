"""Reports over all accounts read rows in proportion to their period, not the history, and the
monthly spend of capped keys one row per key: checked on PostgreSQL's plans (EXPLAIN) for a
year of rollups, through the helper the metering bench prints them with."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from bench.metering.plans import render_plans, report_plans
from billing.core.db import explain, utcnow

KEYS = 100


@pytest.fixture
def history(db: Session) -> list[str]:
    """A year of daily rollups of KEYS keys and ten years of their monthly
    spend, analysed as autovacuum would: the ids of some of the keys."""
    db.execute(
        text(
            "INSERT INTO accounts (id, name, balance_nanos, held_nanos, balance_version,"
            " created_at) VALUES ('acct_plans', 'plans', 0, 0, 0, now())"
        )
    )
    db.execute(
        text(
            "INSERT INTO api_keys (id, account_id, name, key_hash, display_prefix, last4, state,"
            " created_at, held_nanos)"
            " SELECT 'key_plans_' || n, 'acct_plans', 'k', md5('plans' || n), 'sk-', 'abcd',"
            " 'active', now(), 0 FROM generate_series(1, :keys) AS n"
        ),
        {"keys": KEYS},
    )
    db.execute(
        text(
            "INSERT INTO usage_rollups (account_id, key_id, model_id, day, requests,"
            " input_tokens, cached_tokens, output_tokens, reasoning_tokens, cost_nanos)"
            " SELECT 'acct_plans', 'key_plans_' || n, model, CAST(:today AS date) - d,"
            " 1, 1000, 0, 100, 0, 12345"
            " FROM generate_series(1, :keys) AS n, generate_series(0, 364) AS d,"
            " unnest(ARRAY['doubao-seed-2-0-mini']) AS model"
        ),
        {"keys": KEYS, "today": utcnow().date()},
    )
    db.execute(
        text(
            "INSERT INTO key_month_spend (key_id, month, spend_nanos)"
            " SELECT 'key_plans_' || n, CAST(date_trunc('month', CAST(:today AS date)) AS date)"
            " - make_interval(months => m), 12345"
            " FROM generate_series(1, :keys) AS n, generate_series(0, 119) AS m"
        ),
        {"keys": KEYS, "today": utcnow().date()},
    )
    db.execute(text("ANALYZE usage_rollups"))
    db.execute(text("ANALYZE key_month_spend"))
    return [f"key_plans_{n}" for n in range(1, 51)]


def test_each_report_query_reads_its_period_through_an_index(
    db: Session, history: list[str]
) -> None:
    plans = dict(report_plans(db, today=utcnow().date(), key_ids=history))
    assert len(plans) == 6
    for what, plan in plans.items():
        shown = "\n".join(plan)
        assert "Seq Scan" not in shown, f"{what}:\n{shown}"
        if what.startswith("all accounts"):
            assert "ix_usage_rollups_day" in shown, f"{what}:\n{shown}"
        elif what.startswith("one account"):  # by the period or by the account: either is
            assert "Index" in shown, f"{what}:\n{shown}"
        else:
            assert "pk_key_month_spend" in shown, f"{what}:\n{shown}"
    rendered = "\n".join(render_plans(list(plans.items())))
    assert "ix_usage_rollups_day" in rendered and rendered.count("```") == 2 * len(plans)

    # What the index is for: dropped (inside this test's transaction), the same query scans.
    db.execute(text("DROP INDEX ix_usage_rollups_day"))
    plans = dict(report_plans(db, today=utcnow().date(), key_ids=history))
    shown = "\n".join(plans["all accounts, group_by=day, last 7 days"])
    assert "Seq Scan on usage_rollups" in shown, shown


def test_explain_reads_plans_from_postgresql_only() -> None:
    with Session(create_engine("sqlite://")) as session, pytest.raises(ValueError, match="sqlite"):
        explain(session, select(1))
