"""billing_litellm.config: its own variables, with defaults, and clear errors."""

from __future__ import annotations

import pytest

from billing_litellm.config import Config, ConfigError

BASE = {"BILLING_URL": "http://billing.internal:8000/", "BILLING_GATEWAY_TOKEN": "gw-token"}


def test_defaults_need_only_the_url_and_the_token() -> None:
    config = Config.from_env(BASE | {"DATABASE_URL": "postgresql://litellm-owns-this"})
    assert config.billing_url == "http://billing.internal:8000"
    assert config.gateway_token == "gw-token"
    assert config.webhook_secret is None
    assert (config.flush_interval_seconds, config.batch_max) == (0.2, 100)
    assert config.webhook_path == "/billing/webhooks"


def test_every_setting_is_read() -> None:
    config = Config.from_env(
        BASE
        | {
            "BILLING_WEBHOOK_SECRET": "whsec_abc",
            "BILLING_WEBHOOK_PATH": "/hooks/billing",
            "BILLING_TIMEOUT_SECONDS": "1.5",
            "BILLING_USAGE_FLUSH_MS": "50",
            "BILLING_USAGE_BATCH_MAX": "500",
            "BILLING_RETRY_MAX_SECONDS": "10",
            "BILLING_KEY_STATES_POLL_SECONDS": "0",
            "BILLING_MEDIA_TOKENS": "800",
        }
    )
    assert config == Config(
        billing_url="http://billing.internal:8000",
        gateway_token="gw-token",
        webhook_secret="whsec_abc",
        webhook_path="/hooks/billing",
        timeout_seconds=1.5,
        flush_interval_seconds=0.05,
        batch_max=500,
        retry_max_seconds=10.0,
        key_states_poll_seconds=0.0,
        media_tokens=800,
    )


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"BILLING_GATEWAY_TOKEN": "t"}, "BILLING_URL"),
        ({"BILLING_URL": "http://b"}, "BILLING_GATEWAY_TOKEN"),
        (BASE | {"BILLING_URL": "billing:8000"}, "BILLING_URL"),
        (BASE | {"BILLING_USAGE_BATCH_MAX": "1001"}, "BILLING_USAGE_BATCH_MAX"),
        (BASE | {"BILLING_USAGE_FLUSH_MS": "soon"}, "BILLING_USAGE_FLUSH_MS"),
        (BASE | {"BILLING_TIMEOUT_SECONDS": "-1"}, "BILLING_TIMEOUT_SECONDS"),
        (BASE | {"BILLING_TIMEOUT_SECONDS": "0"}, "BILLING_TIMEOUT_SECONDS"),
        (BASE | {"BILLING_WEBHOOK_PATH": "hooks"}, "BILLING_WEBHOOK_PATH"),
    ],
)
def test_a_bad_setting_is_named(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Config.from_env(environ)
