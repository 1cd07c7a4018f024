"""What one run of the metering benchmark does: its command-line options."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

import bench.metering


@dataclass
class Config:
    """What one run does; every field is a command-line option."""

    events: int
    batch: int
    senders: int
    gunicorn_workers: int
    gunicorn_threads: int
    celery_workers: int
    rate: int
    latency_batch: int
    latency_seconds: float
    latency_threads: int
    baseline_runs: int
    accounts: int
    keys_per_account: int
    database: str
    pg: str
    redis_url: str
    profile: bool
    write: bool

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.pg}/{self.database}"

    @property
    def sqlalchemy_url(self) -> str:
        return f"postgresql+psycopg://{self.pg}/{self.database}"


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metering", description=(bench.metering.__doc__ or "").split("\n\n")[0]
    )
    add = parser.add_argument
    add("--events", type=int, default=150_000, help="events of the throughput phase")
    add("--batch", type=int, default=1000, help="events per request (and baseline rows per INSERT)")
    add("--senders", type=int, default=4, help="concurrent load generator processes")
    add("--gunicorn-workers", type=int, default=2)
    add("--gunicorn-threads", type=int, default=2, help="threads per gunicorn worker (gthread)")
    add("--celery-workers", type=int, default=2, help="Celery worker processes (solo pool)")
    add("--rate", type=int, default=1000, help="offered load of the latency phase, events/s")
    add("--latency-batch", type=int, default=100, help="events per request, latency phase")
    add("--latency-seconds", type=float, default=20.0)
    add("--latency-threads", type=int, default=4, help="connections of the paced sender")
    add("--baseline-runs", type=int, default=3, help="repetitions of each baseline (best kept)")
    add("--accounts", type=int, default=10)
    add("--keys-per-account", type=int, default=5)
    add("--database", default="billing_bench", help="dropped and created anew")
    add("--pg", default="postgres@127.0.0.1:5432", help="user@host:port of PostgreSQL")
    add("--redis-url", default="redis://127.0.0.1:6379/14", help="a Redis db of its own: flushed")
    add("--profile", action="store_true", help="py-spy and statement timing (perturbs numbers)")
    add("--no-write", dest="write", action="store_false", help="do not touch BENCHMARKS.md")
    options = parser.parse_args(argv)
    if options.events % options.batch:
        parser.error("--events must be a multiple of --batch")
    if not re.fullmatch(r"\w+", options.database):
        parser.error("--database must be a plain identifier")
    return Config(**vars(options))
