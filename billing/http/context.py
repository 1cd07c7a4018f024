"""What a view may ask of the request it serves: the runtime settings, a session, the clock."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from flask import g, request
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from billing.runtime import current_runtime

if TYPE_CHECKING:
    from billing.accounts.accounts import Account, Funds
    from billing.core.settings import Settings


def settings() -> Settings:
    """The settings in force."""
    return current_runtime().settings


def session() -> Session:
    """The request's session, opened on first use; committed when the response is a success."""
    if "db_session" not in g:
        g.db_session = current_runtime().sessions()
    return g.db_session  # type: ignore[no-any-return]


def funds(account: Account) -> Funds:
    """The account's balance, open holds (in PostgreSQL and Redis) and available balance."""
    return current_runtime().funds(account)


def now() -> dt.datetime:
    """The request's clock, read once per call."""
    return utcnow()


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer`` header, if one was sent."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
