"""Settings, read from the environment (and a `.env` file) by pydantic-settings.

With nothing set, the service runs on the embedded default: a SQLite file under ``DATA_DIR``,
no Redis server, Celery tasks run in-process, rate limits in memory. ``DATABASE_URL`` and
``REDIS_URL`` switch to PostgreSQL, Redis and real worker processes.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.core.money import Nanos, parse_usd, whole_cents

MIN_SECRET_LENGTH = 32
"""The fewest characters of SECRET_KEY and the bootstrap tokens, so that guessing is hopeless."""
GENERATE_SECRET = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'  # noqa: S105
"""A command that prints a good secret (43 characters), for the messages that ask for one."""


def _with_driver(url: str) -> str:
    """``url`` with the driver we ship for PostgreSQL (psycopg 3) when it names none."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    """Every knob of the service. Names are the environment variables (case-insensitive)."""

    # Errors name the setting, never its value: many values are secrets, and start-up errors end
    # up in logs.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(Path("var"), description="Where the embedded default keeps its files.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite in DATA_DIR."
    )
    database_read_url: str | None = Field(
        None,
        description="PostgreSQL URL of a streaming replica of DATABASE_URL for reads that may"
        " lag (usage reports, their CSV, the customer's usage chart); default: the primary.",
    )
    redis_url: str | None = Field(None, description="Redis URL; unset: no Redis, tasks in-process.")
    celery_broker_url: str | None = Field(
        None,
        description="Celery broker: Redis (redis://) or RabbitMQ (amqp://); default: REDIS_URL.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="HMAC key for API keys and tokens; default: generated once into DATA_DIR.",
    )
    billing_admin_token: SecretStr | None = Field(
        None, description=f"Bootstrap admin token, at least {MIN_SECRET_LENGTH} characters."
    )
    billing_gateway_token: SecretStr | None = Field(
        None, description=f"Bootstrap gateway token, at least {MIN_SECRET_LENGTH} characters."
    )
    auth_failure_rate_limit: str = Field(
        "20 per minute",
        description="Failed admin, gateway and API-key authentications allowed per client"
        " address (`limits` syntax); beyond it, that address is answered 429 unchecked.",
    )
    port: int = Field(8000, description="Port `make run` listens on (127.0.0.1).")
    default_rate_limit: str = Field(
        "1 per 10 seconds", description="Rate limit of new keys (`limits` syntax)."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    max_content_length: int = Field(
        2 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest request body accepted, in bytes; larger ones are answered 413"
        " unread. A 1000-event usage batch with every field at its longest is under 1 MiB.",
    )
    # Webhooks (billing.notify)
    webhook_retry_schedule: str | None = Field(
        None,
        description="Seconds to wait before each retry of a failed webhook, comma-separated;"
        " after the last, the delivery has failed."
        " Default: billing.notify.delivery.RETRY_SCHEDULE.",
    )
    webhook_timeout_seconds: float = Field(
        5.0, gt=0, description="Timeout of one webhook request (connect, and each read)."
    )
    webhook_allow_private_urls: bool = Field(
        False,
        description="Let webhook endpoints be loopback, private, link-local or other non-public"
        " addresses (local development and tests; never in production).",
    )
    balance_low_threshold_usd: str = Field(
        "1.00", description="account.balance_low is sent when a balance falls to this or below."
    )

    # Authorize and holds (billing.enforcement.authorize)
    hold_ttl_seconds: int = Field(
        600, ge=1, description="Seconds after which a hold no usage settled is released."
    )
    usage_max_age_days: int = Field(
        35,
        ge=1,
        le=3650,
        description="A usage event whose occurred_at is older than this many days is refused.",
    )
    hold_default_max_output_tokens: int = Field(
        4096,
        ge=1,
        description="Output tokens a hold covers when neither the gateway nor the model's price"
        " says a maximum.",
    )
    hold_min_output_tokens: int = Field(
        256,
        ge=1,
        description="The fewest output tokens a clipped hold may grant; below it, 402.",
    )
    authorize_when_redis_down: Literal["postgres", "refuse"] = Field(
        "postgres",
        description="What authorize does when Redis is unreachable: check and hold through"
        " PostgreSQL with row locks, or refuse with 503.",
    )

    # Operations (billing.health)
    ready_max_settlement_lag_seconds: float = Field(
        300,
        gt=0,
        description="/readyz fails when the oldest usage event waiting for settlement is older.",
    )

    # Violations (billing.accounts.violations)
    violation_threshold: int = Field(
        3, ge=1, description="Content violations within the window that suspend a key (451)."
    )
    violation_window_hours: float = Field(
        24, gt=0, description="The window, in hours, in which violations count toward suspension."
    )

    # Metrics (billing.core.metrics; PROMETHEUS_MULTIPROC_DIR is read by prometheus_client itself)
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token GET /metrics requires; unset or empty: /metrics is a 404."
    )

    @field_validator("billing_admin_token", "billing_gateway_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker-compose passes an unset variable through as "" (`${BILLING_ADMIN_TOKEN:-}`).
        return None if value == "" else value

    @field_validator("secret_key", "billing_admin_token", "billing_gateway_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # An empty SECRET_KEY is judged by _secret_key_where_needed, which knows the topology.
        length = 0 if value is None else len(value.get_secret_value())
        if 0 < length < MIN_SECRET_LENGTH:
            raise ValueError(_too_short(str(info.field_name), length))
        return value

    @model_validator(mode="after")
    def _secret_key_where_needed(self) -> Settings:
        if self.secret_key is not None and not self.secret_key.get_secret_value():
            if not self.embedded_default:
                raise ValueError(
                    "SECRET_KEY is empty: beyond the embedded default (SQLite, no Redis) the API,"
                    " workers and beat must share one secret of at least"
                    f" {MIN_SECRET_LENGTH} random characters. Generate one with: {GENERATE_SECRET}"
                )
            self.secret_key = None  # the embedded default generates its own
        return self

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            cls._delays(value)
        return value

    @field_validator("balance_low_threshold_usd")
    @classmethod
    def _threshold(cls, value: str) -> str:
        if parse_usd(value) < 0:
            raise ValueError("must not be negative")
        return value

    @staticmethod
    def _delays(text: str) -> tuple[float, ...]:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
        if any(not math.isfinite(delay) or delay < 0 for delay in delays):
            raise ValueError("delays are finite, non-negative numbers of seconds")
        return delays

    @property
    def usage_max_age(self) -> dt.timedelta:
        """How far in the past a usage event's ``occurred_at`` may lie."""
        return dt.timedelta(days=self.usage_max_age_days)

    @property
    def webhook_retry_delays(self) -> tuple[float, ...] | None:
        """The configured webhook retry schedule in seconds; None: the production schedule."""
        if self.webhook_retry_schedule is None:
            return None
        return self._delays(self.webhook_retry_schedule)

    @property
    def balance_low_threshold(self) -> Nanos:
        """The balance-low threshold in nano-dollars."""
        return parse_usd(self.balance_low_threshold_usd)

    @cached_property
    def sqlalchemy_url(self) -> str:
        """The database URL in force, with the driver we ship for PostgreSQL."""
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'billing.sqlite3').resolve()}"
        return _with_driver(self.database_url)

    @property
    def sqlalchemy_read_url(self) -> str | None:
        """The replica's URL with our PostgreSQL driver, or None: reports read the primary."""
        return _with_driver(self.database_read_url) if self.database_read_url else None

    @model_validator(mode="after")
    def _replica(self) -> Settings:
        if self.database_read_url:
            if not self.database_url:
                raise ValueError("DATABASE_READ_URL is a replica of DATABASE_URL: set both")
            if not _with_driver(self.database_read_url).startswith("postgresql+"):
                raise ValueError("DATABASE_READ_URL must be a PostgreSQL URL (postgresql://...)")
        return self

    @property
    def broker_url(self) -> str | None:
        """The Celery broker in force: CELERY_BROKER_URL, else REDIS_URL (None when embedded)."""
        if self.embedded:
            return None
        return self.celery_broker_url or self.redis_url

    @property
    def embedded(self) -> bool:
        """True when running on the embedded default (no Redis: tasks run in-process)."""
        return not self.redis_url

    @property
    def embedded_default(self) -> bool:
        """True on the embedded default proper: SQLite and no Redis, so one host and one
        DATA_DIR, where a generated SECRET_KEY is as good as a configured one."""
        return self.sqlalchemy_url.startswith("sqlite") and self.embedded

    @cached_property
    def hmac_key(self) -> bytes:
        """The server secret keying every stored hash; generated once for the embedded default."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.data_dir / "secret_key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip().encode()

    # Stripe and top-ups (billing.payments)
    stripe_api_base: str = Field(
        "https://api.stripe.com", description="Stripe API base URL (localstripe in tests and demo)."
    )
    stripe_secret_key: SecretStr | None = Field(None, description="Stripe secret API key.")
    stripe_publishable_key: str | None = Field(
        None, description="Stripe publishable key, given to Stripe.js on the top-up page."
    )
    stripe_webhook_secret: SecretStr | None = Field(
        None, description="Signing secret of the Stripe webhook endpoint (`whsec_...`)."
    )
    stripe_js_url: str = Field(
        "https://js.stripe.com/v3/", description="Where the top-up page loads Stripe.js from."
    )
    topup_mode: str = Field(
        "payment_intent",
        pattern="^(payment_intent|checkout)$",
        description="payment_intent (card form on the page) or checkout (Stripe Checkout).",
    )
    topup_min_usd: str = Field("5.00", description="Smallest top-up, in USD.")
    topup_max_usd: str = Field("1000.00", description="Largest top-up, in USD.")
    topup_presets_usd: str = Field(
        "10,25,50", description="Preset top-up amounts offered on the page, comma-separated USD."
    )
    public_base_url: str = Field(
        "http://127.0.0.1:8000",
        description="Where customers reach this service (Checkout success and cancel URLs).",
    )
    stripe_reconcile_hours: float = Field(
        48, gt=0, description="How far back reconciliation looks for unfulfilled payments."
    )
    auto_recharge_daily_cap_usd: str = Field(
        "500.00", description="Default most auto-recharge may charge one account per UTC day."
    )
    auto_recharge_backoff_seconds: float = Field(
        3600, gt=0, description="Wait after a declined auto-recharge; doubles per decline."
    )

    @field_validator(
        "topup_min_usd", "topup_max_usd", "topup_presets_usd", "auto_recharge_daily_cap_usd"
    )
    @classmethod
    def _usd_amounts(cls, value: str) -> str:
        for part in value.split(","):
            if parse_usd(part.strip()) <= 0:
                raise ValueError("amounts must be positive")
            if not whole_cents(parse_usd(part.strip())):
                raise ValueError("amounts must be whole cents")
        return value

    @model_validator(mode="after")
    def _top_up_limits(self) -> Settings:
        if self.topup_min > self.topup_max:
            raise ValueError("TOPUP_MIN_USD must not be above TOPUP_MAX_USD")
        outside = [p for p in self.topup_presets if not self.topup_min <= p <= self.topup_max]
        if outside:
            raise ValueError("every TOPUP_PRESETS_USD amount must be within the top-up limits")
        return self

    @property
    def topup_min(self) -> Nanos:
        """The smallest top-up in nano-dollars."""
        return parse_usd(self.topup_min_usd)

    @property
    def topup_max(self) -> Nanos:
        """The largest top-up in nano-dollars."""
        return parse_usd(self.topup_max_usd)

    @property
    def topup_presets(self) -> list[Nanos]:
        """The preset top-up amounts in nano-dollars, in the configured order."""
        return [parse_usd(part.strip()) for part in self.topup_presets_usd.split(",")]

    @property
    def auto_recharge_daily_cap(self) -> Nanos:
        """The default auto-recharge daily cap in nano-dollars."""
        return parse_usd(self.auto_recharge_daily_cap_usd)

    # Customer page (billing.web)
    session_cookie_secure: bool = Field(
        True,
        description="Send the /billing session cookie over HTTPS only. Browsers accept it from"
        " http://127.0.0.1 and http://localhost too; set false to serve the page over plain HTTP"
        " on another host.",
    )
    billing_session_hours: float = Field(
        12, gt=0, description="How long a sign-in to the /billing page lasts at most, in hours."
    )
    billing_session_idle_minutes: float = Field(
        30,
        gt=0,
        description="A /billing session unused for this many minutes has ended (signed in or not).",
    )
    billing_sign_in_rate_limit: str = Field(
        "10 per minute",
        description="Sign-in attempts allowed per client IP on /billing (`limits` syntax).",
    )

    @field_validator("billing_sign_in_rate_limit", "auth_failure_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse

        parse(value)  # raises ValueError naming the problem
        return value


def _too_short(field: str, length: int) -> str:
    """Why a secret setting is refused, and how to make a good one."""
    return (
        f"{field.upper()} has {length} characters; it must have at least {MIN_SECRET_LENGTH}"
        f" random characters. Generate one with: {GENERATE_SECRET}"
    )
