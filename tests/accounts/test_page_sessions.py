"""The page's server-side sessions, with the clock given: idle and absolute expiry, the key's
expiry, tokens that are not ours, and the purge of ended sessions."""

from __future__ import annotations

import datetime as dt

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.accounts import keys, page_sessions
from billing.accounts.page_sessions import Lifetimes, PageSession
from billing.core.db import utcnow
from tests.conftest import SECRET_KEY
from tests.support import new_key

HMAC_KEY = SECRET_KEY.encode()
LIFETIMES = Lifetimes(idle=dt.timedelta(minutes=30), absolute=dt.timedelta(hours=12))


@pytest.fixture
def account_id(admin: FlaskClient) -> str:
    account: str = admin.post("/admin/v1/accounts", json={"name": "Acme"}).get_json()["id"]
    return account


@pytest.fixture
def key(admin: FlaskClient, db: Session, account_id: str) -> keys.ApiKey:
    return keys.get_key(db, new_key(admin, account_id)["id"])


def start(db: Session, key: keys.ApiKey | None, now: dt.datetime) -> str:
    _, token = page_sessions.start(
        db, key=key, data={"csrf_token": "c"}, hmac_key=HMAC_KEY, lifetimes=LIFETIMES, now=now
    )
    return token


def resume(db: Session, token: str, now: dt.datetime) -> keys.ApiKey | bool | None:
    """The session's key (None: anonymous), or False once it has ended."""
    found = page_sessions.resume(db, token, hmac_key=HMAC_KEY, lifetimes=LIFETIMES, now=now)
    return False if found is None else found[1]


def stored(db: Session) -> int:
    return int(db.scalar(select(func.count()).select_from(PageSession)) or 0)


def test_a_session_in_use_lives_on_and_ends_once_idle(db: Session, key: keys.ApiKey) -> None:
    began = utcnow()
    token = start(db, key, began)
    signed = resume(db, token, began + dt.timedelta(minutes=29))
    assert isinstance(signed, keys.ApiKey) and signed.id == key.id
    # Used at 29 minutes: idle from then, not from the start.
    assert resume(db, token, began + dt.timedelta(minutes=58)) is not False

    assert resume(db, token, began + dt.timedelta(minutes=88)) is False
    assert stored(db) == 0  # ended is deleted
    assert resume(db, token, began + dt.timedelta(minutes=58)) is False  # even if time ran back


def test_a_session_ends_at_its_absolute_lifetime_however_much_it_is_used(
    db: Session, key: keys.ApiKey
) -> None:
    began = utcnow()
    token = start(db, key, began)
    moment = began
    while moment + dt.timedelta(minutes=20) < began + LIFETIMES.absolute:
        moment += dt.timedelta(minutes=20)
        assert resume(db, token, moment) is not False, moment - began

    assert resume(db, token, began + LIFETIMES.absolute) is False


def test_a_session_ends_when_its_key_expires(
    admin: FlaskClient, db: Session, account_id: str
) -> None:
    began = utcnow()
    expiring = new_key(admin, account_id, expires_at=(began + dt.timedelta(hours=1)).isoformat())
    token = start(db, keys.get_key(db, expiring["id"]), began)
    for minutes in (25, 50, 59):  # in use, so never idle
        assert resume(db, token, began + dt.timedelta(minutes=minutes)) is not False

    assert resume(db, token, began + dt.timedelta(minutes=61)) is False
    assert stored(db) == 0


def test_an_anonymous_session_resumes_without_a_key(db: Session) -> None:
    began = utcnow()
    token = start(db, None, began)
    found = page_sessions.resume(
        db, token, hmac_key=HMAC_KEY, lifetimes=LIFETIMES, now=began + dt.timedelta(minutes=5)
    )
    assert found is not None
    row, key = found
    assert key is None and row.key_id is None and row.data == {"csrf_token": "c"}


@pytest.mark.parametrize(
    "token", ["", "x", "\x00" * 43, "A" * 42 + "\x00", "A" * 44, "A" * 42 + "/", "é" * 43]
)
def test_a_token_that_is_not_ours_resumes_nothing(
    db: Session, key: keys.ApiKey, token: str
) -> None:
    start(db, key, utcnow())
    assert resume(db, token, utcnow()) is False
    assert stored(db) == 1


def test_a_token_under_another_server_secret_resumes_nothing(db: Session, key: keys.ApiKey) -> None:
    token = start(db, key, utcnow())
    found = page_sessions.resume(
        db, token, hmac_key=b"another secret", lifetimes=LIFETIMES, now=utcnow()
    )
    assert found is None


def test_purge_deletes_the_ended_sessions_only(db: Session, key: keys.ApiKey) -> None:
    now = utcnow()
    ages = {  # name: (age, idle for), in minutes
        "idle": (31, 31),
        "idle for exactly the limit": (30, 30),
        "too old, though in use": (13 * 60, 1),
        "fresh": (10, 10),
        "long, and in use": (11 * 60, 5),
    }
    for name, (age, idle) in ages.items():
        db.add(
            PageSession(
                token_hash=name,
                key_id=key.id,
                key_hash=key.key_hash,
                data={},
                created_at=now - dt.timedelta(minutes=age),
                last_seen_at=now - dt.timedelta(minutes=idle),
            )
        )
    db.flush()

    assert page_sessions.purge(db, lifetimes=LIFETIMES, now=now) == 3

    assert set(db.scalars(select(PageSession.token_hash))) == {"fresh", "long, and in use"}
