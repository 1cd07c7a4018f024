"""Metrics across processes: a real gunicorn with two workers and a real Celery worker sharing
one ``PROMETHEUS_MULTIPROC_DIR``; every scrape, whichever worker answers it, counts what every
process did."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery
from sqlalchemy import Engine

from billing.core.settings import Settings
from tests.conftest import GATEWAY_TOKEN, worker_env
from tests.reliability.conftest import (
    MODEL,
    Workers,
    recent,
    scalar,
    start_api,
    stop,
    usage_event,
    wait_until,
)
from tests.reliability.support import wait_settled
from tests.support import metric_samples, sample

TOKEN = "test-metrics-token"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def test_every_scrape_counts_what_every_process_did(
    redis_settings: Settings,
    app: Any,
    celery_client: Celery,
    committed: Engine,
    workers: Workers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    # Read by the processes started below (worker_env copies the environment).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    monkeypatch.setenv("METRICS_TOKEN", TOKEN)
    api = start_api(worker_env(redis_settings), tmp_path / "gunicorn.log", workers=2, threads=2)
    gateway = {"Authorization": f"Bearer {GATEWAY_TOKEN}"}

    def scrape() -> Samples:
        response = requests.get(
            f"{api.base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        return metric_samples(response.text)

    try:
        account_id = api.create_account("metrics", credit_usd="10.00")
        response = api.admin(
            "POST", f"/accounts/{account_id}/keys", json={"name": "k", "rate_limit": "100/second"}
        )
        assert response.status_code == 201, response.text
        key = response.json()

        # Three authorizes (the first of each gunicorn worker goes through Flask, later ones
        # are answered in front of it) and one refusal; each holds in Redis.
        request_ids = [str(uuid.uuid4()) for _ in range(3)]
        held = Decimal(0)
        for request_id in request_ids:
            answer = requests.post(
                f"{api.base}/gateway/v1/authorize",
                json={"api_key": key["key"], "model": MODEL, "request_id": request_id},
                headers=gateway,
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            held += Decimal(answer.json()["hold_usd"])
        refused = requests.post(
            f"{api.base}/gateway/v1/authorize",
            json={"api_key": "sk-" + "0" * 48, "model": MODEL, "request_id": "r"},
            headers=gateway,
            timeout=10,
        )
        assert refused.status_code == 401

        # Usage in separate requests (so both gunicorn workers may take some), with no Celery
        # worker yet: the events stay pending.
        events = [usage_event(rid, key["id"], 1000, 100, recent()) for rid in request_ids]
        events += [usage_event(str(uuid.uuid4()), key["id"], 10, 10, recent()) for _ in range(3)]
        for event in events:
            assert api.post_usage([event]).status_code == 202
        answer = api.post_usage([events[0], usage_event("bad", key["id"], -1, 0, recent())])
        assert (answer.json()["duplicates"], len(answer.json()["rejected"])) == (1, 1)

        pending = scrape()
        assert sample(pending, "billing_settlement_lag_seconds") > 0
        assert sample(pending, "billing_open_holds", store="redis") == 3
        assert sample(pending, "billing_open_holds_nanodollars", store="redis") == held * 10**9

        workers.start(1)
        wait_settled(committed, len(events), celery_client)
        charged = -scalar(
            committed, "SELECT sum(amount_nanos) FROM ledger_entries WHERE kind = 'usage'"
        )
        assert charged > 0

        def settled_everywhere() -> list[Samples]:
            # Settlement's counters are written by the Celery worker after its commit.
            scrapes = [scrape() for _ in range(4)]
            done = all(
                sample(s, "billing_usage_settled_events_total") == len(events) for s in scrapes
            )
            return scrapes if done else []

        for samples in wait_until(settled_everywhere, "the worker's counters in every scrape"):
            assert sample(samples, "billing_usage_events_total", outcome="accepted") == 6
            assert sample(samples, "billing_usage_events_total", outcome="duplicate") == 1
            assert sample(samples, "billing_usage_events_total", outcome="rejected") == 1
            assert sample(samples, "billing_usage_charged_nanodollars_total") == charged
            assert sample(samples, "billing_settlement_lag_seconds") == 0
            assert sample(samples, "billing_open_holds", store="redis") == 0
            decisions = {
                name: value
                for name, value in samples.items()
                if name[0] == "billing_authorize_decisions_total"
            }
            assert sum(decisions.values()) == 4
            allowed = sum(
                v for (_, labels), v in decisions.items() if ("code", "allowed") in labels
            )
            assert allowed == 3
            assert (
                sample(samples, "billing_authorize_duration_seconds_count", path="fast")
                + sample(samples, "billing_authorize_duration_seconds_count", path="app")
                == 4
            )
        # Each process wrote its own files: two gunicorn workers and the Celery worker.
        assert len(list(directory.glob("counter_*.db"))) >= 3
    finally:
        stop(api.process)
