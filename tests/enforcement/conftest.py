"""The authorize edge under test on each place holds can go: PostgreSQL (the embedded default,
and the fallback when Redis is down) and Redis (the hot path)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from billing.app import create_app
from billing.core.settings import Settings
from billing.enforcement import hotpath
from billing.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, GATEWAY_TOKEN
from tests.support import client_with


@pytest.fixture(scope="session")
def redis_app(app: Flask, redis_settings: Settings) -> Flask:
    """An app whose authorize uses Redis (``app`` has loaded the price table already)."""
    return create_app(redis_settings)


@dataclass
class Edge:
    """One app under test, with admin and gateway clients."""

    backend: str
    app: Flask
    runtime: Runtime
    admin: FlaskClient
    gateway: FlaskClient


@contextmanager
def joined(flask_app: Flask, db: Session, backend: str) -> Iterator[Edge]:
    """``flask_app`` with its requests joining the test's rolled-back transaction."""
    runtime: Runtime = flask_app.extensions["billing"]
    if runtime.redis is not None and backend == "redis":
        # Holds of earlier tests, whose accounts were rolled back, would expire in this one.
        runtime.redis.delete(hotpath.HOLDS, hotpath.EXPIRY)
    original = runtime.sessions
    runtime.sessions = sessionmaker(
        bind=db.get_bind(), join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    try:
        yield Edge(
            backend,
            flask_app,
            runtime,
            client_with(flask_app, ADMIN_TOKEN),
            client_with(flask_app, GATEWAY_TOKEN),
        )
    finally:
        runtime.sessions = original


@pytest.fixture(params=["postgres", "redis"])
def edge(request: pytest.FixtureRequest, app: Flask, db: Session) -> Iterator[Edge]:
    """Each test on PostgreSQL and on Redis."""
    flask_app = app if request.param == "postgres" else request.getfixturevalue("redis_app")
    with joined(flask_app, db, request.param) as joined_edge:
        yield joined_edge
