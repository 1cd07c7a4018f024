"""The service under test as the benchmarks configure it: bootstrap tokens of their own, the
environment its processes start with, and a database of its own created anew."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from bench.harness.processes import ROOT

GATEWAY_TOKEN = "bench-gateway-token"  # noqa: S105 - a local benchmark's bootstrap token
ADMIN_TOKEN = "bench-admin-token"  # noqa: S105
SECRET_KEY = "bench-server-secret"  # noqa: S105


def service_env(workdir: Path, database_url: str, redis_url: str) -> dict[str, str]:
    """The environment of the service's processes (gunicorn, Celery, the ``billing`` CLI)."""
    return os.environ | {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SECRET_KEY": SECRET_KEY,
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
        "BILLING_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "DATA_DIR": str(workdir / "data"),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }


def recreate_database(pg: str, database: str) -> None:
    """Drop ``database`` (whoever is connected) and create it empty; ``pg`` is user@host:port."""
    with psycopg.connect(f"postgresql://{pg}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{database}"')
