"""Settings, read from the environment (and a `.env` file) by pydantic-settings.

With nothing set, the service runs on the embedded default: a SQLite file under ``DATA_DIR``,
no Redis server, Celery tasks run in-process, rate limits in memory. ``DATABASE_URL`` and
``REDIS_URL`` switch to PostgreSQL, Redis and real worker processes.
"""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service. Names are the environment variables (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Where the embedded default keeps its files.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite in DATA_DIR."
    )
    redis_url: str | None = Field(None, description="Redis URL; unset: no Redis, tasks in-process.")
    secret_key: SecretStr | None = Field(
        None,
        description="HMAC key for API keys and tokens; default: generated once into DATA_DIR.",
    )
    billing_admin_token: SecretStr | None = Field(None, description="Bootstrap admin token.")
    billing_gateway_token: SecretStr | None = Field(None, description="Bootstrap gateway token.")
    port: int = Field(8000, description="Port `make run` listens on (127.0.0.1).")
    default_rate_limit: str = Field(
        "1 per 10 seconds", description="Rate limit of new keys (`limits` syntax)."
    )
    log_level: str = Field("INFO", description="Python logging level.")

    @cached_property
    def sqlalchemy_url(self) -> str:
        """The database URL in force, with the driver we ship for PostgreSQL."""
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'billing.sqlite3').resolve()}"
        url = self.database_url
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def embedded(self) -> bool:
        """True when running on the embedded default (no Redis: tasks run in-process)."""
        return not self.redis_url

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
