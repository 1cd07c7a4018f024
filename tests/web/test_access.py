"""The sign-in limiter's storage: Redis when REDIS_URL is set (every API process shares the
window), and what happens when that Redis is gone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flask import Flask
from limits.storage import RedisStorage

from billing.web import access
from tests.conftest import TEST_REDIS_URL, make_settings


def limited_app(data_dir: Path, redis_url: str) -> Flask:
    app = Flask(__name__)
    settings = make_settings(data_dir, redis_url=redis_url, billing_sign_in_rate_limit="2/minute")
    access.init_app(app, settings)
    return app


def test_the_window_is_in_redis_and_shared_by_every_process(tmp_path: Path) -> None:
    first, second = limited_app(tmp_path, TEST_REDIS_URL), limited_app(tmp_path, TEST_REDIS_URL)
    with first.app_context():
        limiter = access.limiter()
        assert isinstance(limiter.storage, RedisStorage)
        limiter.reset()
        limiter.hit("192.0.2.1")
        limiter.hit("192.0.2.1")
        access.limiter().hit("192.0.2.2")  # another client has a window of its own
    with second.app_context(), pytest.raises(access.TooManySignIns) as refused:
        access.limiter().hit("192.0.2.1")
    assert refused.value.status == 429
    assert refused.value.retry_after is not None and 1 <= refused.value.retry_after <= 61
    with first.app_context():
        access.limiter().reset()


def test_sign_in_stays_possible_when_redis_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = limited_app(tmp_path, "redis://127.0.0.1:1/0")  # nothing listens there
    with app.app_context(), caplog.at_level(logging.WARNING):
        for _ in range(5):
            access.limiter().hit("192.0.2.1")
    assert "sign-in rate limit unavailable" in caplog.text
