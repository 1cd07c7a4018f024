"""`billing webhooks deliver`: how the embedded default (SQLite, no Redis, no worker) sends."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from billing.accounts import accounts, keys
from billing.app import create_app
from billing.cli import main
from billing.core.db import utcnow
from billing.core.settings import Settings
from billing.notify import endpoints
from billing.runtime import Runtime
from tests.conftest import SECRET_KEY
from tests.notify.conftest import Receiver


def run(*args: str, env: dict[str, str]) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_the_cli_delivers_on_the_embedded_default(tmp_path: Path, receiver: Receiver) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'hooks.sqlite3'}",
        "REDIS_URL": "",
        "DATA_DIR": str(tmp_path),
        "SECRET_KEY": SECRET_KEY,
        "WEBHOOK_ALLOW_PRIVATE_URLS": "true",  # the receiver listens on 127.0.0.1
    }
    assert run("db", "upgrade", env=env).exit_code == 0
    settings = Settings(
        _env_file=None,
        database_url=env["DATABASE_URL"],
        data_dir=tmp_path,
        secret_key=SECRET_KEY,
    )
    runtime: Runtime = create_app(settings).extensions["billing"]
    with runtime.transaction() as session:
        now = utcnow()
        _, receiver.secret = endpoints.create_endpoint(
            session,
            url=receiver.url,
            event_types=None,
            hmac_key=settings.hmac_key,
            allow_private=True,
            now=now,
        )
        account = accounts.create_account(session, name="embedded", email=None, now=now)
        key, _ = keys.issue_key(
            session,
            account_id=account.id,
            settings=keys.KeySettings("k", None, None, None, None),
            hmac_key=settings.hmac_key,
            now=now,
        )
    assert receiver.requests() == []  # committing sent nothing: no request waits on a receiver

    result = run("webhooks", "deliver", env=env)
    assert result.exit_code == 0, result.output
    assert "1 webhook attempt(s) made" in result.output
    [request] = receiver.requests()
    assert request.error is None
    assert request.data["key_id"] == key.id
    assert request.data["state"] == "insufficient_balance"
    assert "0 webhook attempt(s) made" in run("webhooks", "deliver", env=env).output
