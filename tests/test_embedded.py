"""The embedded default, end to end: `billing serve` with no configuration (SQLite, no Redis),
and the README's curl walk-through run verbatim against it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh machine: none of our settings, whatever the caller has."""
    names = {
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "BILLING_ADMIN_TOKEN",
        "BILLING_GATEWAY_TOKEN",
        "DATA_DIR",
    }
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    return env | extra


@dataclass
class Server:
    base: str
    cwd: Path
    port: int


@pytest.fixture
def embedded_server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "billing"), "serve"],
        cwd=tmp_path,
        env=clean_env(PORT=str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"billing serve did not start:\n{(tmp_path / 'server.log').read_text()}"
                )
            time.sleep(0.2)
        yield Server(base, tmp_path, port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def readme_walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Walk-through", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "the README walk-through has no sh block"
    return match.group(1)


def test_serve_uses_sqlite_and_needs_no_redis(embedded_server: Server) -> None:
    data = embedded_server.cwd / "var"
    assert (data / "billing.sqlite3").exists()
    assert (data / "admin_token").stat().st_mode & 0o077 == 0, "the token file is private"
    assert (data / "secret_key").stat().st_mode & 0o077 == 0, "the secret file is private"
    token = (data / "admin_token").read_text().strip()
    models = requests.get(
        f"{embedded_server.base}/admin/v1/models",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    ).json()
    assert {m["id"] for m in models["data"]} == {
        "doubao-seed-2-0-mini",
        "doubao-seed-2-0-lite",
        "doubao-seed-2-0-code",
    }


def test_readme_walkthrough_works_as_written(embedded_server: Server) -> None:
    script = readme_walkthrough().replace("127.0.0.1:8000", f"127.0.0.1:{embedded_server.port}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=embedded_server.cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    account_id = re.search(r"account: (acct_\w+)", result.stdout)
    assert account_id, result.stdout
    token = (embedded_server.cwd / "var" / "admin_token").read_text().strip()
    admin = {"Authorization": f"Bearer {token}"}
    account = requests.get(
        f"{embedded_server.base}/admin/v1/accounts/{account_id[1]}", headers=admin, timeout=5
    ).json()
    assert account["balance_usd"] == "10.000000000"
    assert account["available_usd"] == "10.000000000"
    keys = requests.get(
        f"{embedded_server.base}/admin/v1/accounts/{account_id[1]}/keys", headers=admin, timeout=5
    ).json()
    assert [key["state"] for key in keys["data"]] == ["active"]
    assert '"id":"doubao-seed-2-0-lite"' in result.stdout, "the customer saw the priced models"

    server_log = (embedded_server.cwd / "server.log").read_text()
    assert f"GET /admin/v1/accounts/{account_id[1]}/keys" in server_log, "requests are logged"
    key_prefix = re.search(r"key: (sk-\w+)\.\.\.", result.stdout)
    assert key_prefix
    secrets = [token, key_prefix[1]]
    assert not [secret for secret in secrets if secret in server_log], "a secret reached the log"
