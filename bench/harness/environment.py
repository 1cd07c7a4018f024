"""The service under test as the benchmarks configure it: bootstrap tokens of their own, the
environment its processes start with, and a database of its own created anew."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from bench.harness.processes import ROOT

# A local benchmark's bootstrap secrets, as long as the settings demand (MIN_SECRET_LENGTH).
GATEWAY_TOKEN = "bench-gateway-token-4d9f2a7c1e8b3065d4f9"  # noqa: S105
ADMIN_TOKEN = "bench-admin-token-9a2e5c8f1b7d4036a9e2"  # noqa: S105
SECRET_KEY = "bench-server-secret-6b1d8f3a9c2e7054b6d1"  # noqa: S105


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
