"""The integration's settings, read from its own environment variables (all ``BILLING_*``, so
none clashes with LiteLLM's, such as ``DATABASE_URL``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

Number = TypeVar("Number", int, float)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Config:
    """What the integration needs to reach the billing service and how it batches."""

    billing_url: str
    gateway_token: str
    webhook_secret: str | None = None
    webhook_path: str = "/billing/webhooks"
    timeout_seconds: float = 5.0
    flush_interval_seconds: float = 0.2
    batch_max: int = 100
    retry_max_seconds: float = 30.0
    key_states_poll_seconds: float = 30.0
    media_tokens: int = 1500

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """The settings of ``environ`` (default ``os.environ``); raises ConfigError."""
        env = os.environ if environ is None else environ
        url = _required(env, "BILLING_URL").rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"BILLING_URL must be an http(s) URL, not {url!r}.")
        path = env.get("BILLING_WEBHOOK_PATH", cls.webhook_path)
        if not path.startswith("/"):
            raise ConfigError("BILLING_WEBHOOK_PATH must start with '/'.")
        timeout = _number(env, "BILLING_TIMEOUT_SECONDS", cls.timeout_seconds, float)
        if timeout <= 0:
            raise ConfigError("BILLING_TIMEOUT_SECONDS must be more than 0.")
        batch_max = _number(env, "BILLING_USAGE_BATCH_MAX", cls.batch_max, int)
        if not 1 <= batch_max <= 1000:
            raise ConfigError("BILLING_USAGE_BATCH_MAX must be between 1 and 1000.")
        return cls(
            billing_url=url,
            gateway_token=_required(env, "BILLING_GATEWAY_TOKEN"),
            webhook_secret=env.get("BILLING_WEBHOOK_SECRET") or None,
            webhook_path=path,
            timeout_seconds=timeout,
            flush_interval_seconds=_number(env, "BILLING_USAGE_FLUSH_MS", 200, int) / 1000,
            batch_max=batch_max,
            retry_max_seconds=_number(
                env, "BILLING_RETRY_MAX_SECONDS", cls.retry_max_seconds, float
            ),
            key_states_poll_seconds=_number(
                env, "BILLING_KEY_STATES_POLL_SECONDS", cls.key_states_poll_seconds, float
            ),
            media_tokens=_number(env, "BILLING_MEDIA_TOKENS", cls.media_tokens, int),
        )


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set: the billing integration needs it.")
    return value


def _number(env: Mapping[str, str], name: str, default: Number, kind: type[Number]) -> Number:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}.") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative.")
    return value
