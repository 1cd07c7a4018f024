"""Weak configuration is refused at start-up (issue 10, item 7): an empty or short SECRET_KEY
beyond the embedded default, and bootstrap tokens shorter than 32 characters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from billing.core.settings import GENERATE_SECRET, MIN_SECRET_LENGTH, Settings
from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL

GOOD = "g" * MIN_SECRET_LENGTH
SHORT = "weak-but-typed-with-care-31char"  # one character short
assert len(SHORT) == MIN_SECRET_LENGTH - 1


def settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **values)


def refusal(tmp_path: Path, **values: Any) -> str:
    """The message of the ValidationError these settings raise."""
    with pytest.raises(ValidationError) as refused:
        settings(tmp_path, **values)
    return str(refused.value)


TOPOLOGIES = {
    "embedded": {},
    "postgres": {"database_url": TEST_DATABASE_URL},
    "redis": {"redis_url": TEST_REDIS_URL},
}


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("field", ["secret_key", "billing_admin_token", "billing_gateway_token"])
def test_a_short_secret_is_refused_naming_it_and_how_to_make_one(
    tmp_path: Path, topology: str, field: str
) -> None:
    message = refusal(tmp_path, **TOPOLOGIES[topology], **{field: SHORT})
    assert f"{field.upper()} has 31 characters" in message
    assert f"at least {MIN_SECRET_LENGTH}" in message
    assert GENERATE_SECRET in message
    assert SHORT not in message  # a refused secret is never echoed into a log


@pytest.mark.parametrize("topology", ["postgres", "redis"])
def test_an_empty_secret_key_is_refused_beyond_the_embedded_default(
    tmp_path: Path, topology: str
) -> None:
    message = refusal(tmp_path, **TOPOLOGIES[topology], secret_key="")
    assert "SECRET_KEY is empty" in message
    assert GENERATE_SECRET in message


def test_the_embedded_default_generates_its_own_secret_key_when_it_is_empty(
    tmp_path: Path,
) -> None:
    embedded = settings(tmp_path, secret_key="")
    assert embedded.secret_key is None
    key = embedded.hmac_key
    assert len(key) >= MIN_SECRET_LENGTH
    assert key == (tmp_path / "secret_key").read_text().strip().encode()
    assert settings(tmp_path).hmac_key == key  # the same one, kept


def test_empty_bootstrap_tokens_are_unset(tmp_path: Path) -> None:
    """docker-compose passes an unset BILLING_*_TOKEN as an empty string."""
    quiet = settings(
        tmp_path, database_url=TEST_DATABASE_URL, billing_admin_token="", billing_gateway_token=""
    )
    assert (quiet.billing_admin_token, quiet.billing_gateway_token) == (None, None)


def test_secrets_of_32_characters_are_accepted(tmp_path: Path) -> None:
    good = settings(
        tmp_path,
        database_url=TEST_DATABASE_URL,
        redis_url=TEST_REDIS_URL,
        secret_key=GOOD,
        billing_admin_token=GOOD,
        billing_gateway_token=GOOD,
    )
    assert good.hmac_key == GOOD.encode()
    assert good.billing_admin_token is not None
    assert good.billing_admin_token.get_secret_value() == GOOD


def environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A deployment's environment (PostgreSQL, no Redis) with ``overrides``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name.upper() not in {"SECRET_KEY", "BILLING_ADMIN_TOKEN", "BILLING_GATEWAY_TOKEN"}
    }
    return env | {
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": "",
        "DATA_DIR": str(tmp_path),
        "SECRET_KEY": GOOD,
        **overrides,
    }


BIN = Path(sys.executable).parent


# Each start-up path with one weak setting (every setting is checked by each, through Settings).
@pytest.mark.parametrize(
    ("command", "setting"),
    [
        ([str(BIN / "billing"), "serve"], "BILLING_ADMIN_TOKEN"),
        ([str(BIN / "gunicorn"), "--bind", "127.0.0.1:0", "billing.wsgi:app"], "SECRET_KEY"),
        (
            [str(BIN / "celery"), "-A", "workers.app", "worker", "--pool=solo"],
            "BILLING_GATEWAY_TOKEN",
        ),
    ],
    ids=["billing serve", "gunicorn", "celery worker"],
)
def test_every_process_refuses_to_start_with_a_weak_secret(
    tmp_path: Path, command: list[str], setting: str
) -> None:
    started = subprocess.run(
        command,
        env=environment(tmp_path, **{setting: SHORT}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = started.stdout + started.stderr
    assert started.returncode != 0, output
    assert f"{setting} has 31 characters" in output
    assert GENERATE_SECRET in output
    assert SHORT not in output
