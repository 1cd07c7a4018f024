"""What a view may ask of the request it serves: the runtime settings, a session, the clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from flask import g, request
from sqlalchemy.orm import Session

from billing.core.db import utcnow
from billing.core.errors import BillingError
from billing.runtime import current_runtime

if TYPE_CHECKING:
    from billing.accounts.accounts import Account, Funds
    from billing.core.settings import Settings

T = TypeVar("T")


def settings() -> Settings:
    """The settings in force."""
    return current_runtime().settings


def session() -> Session:
    """The request's session, opened on first use; committed when the response is a success."""
    if "db_session" not in g:
        g.db_session = current_runtime().sessions()
    return g.db_session  # type: ignore[no-any-return]


def report_session() -> Session:
    """The request's session for reads that may lag behind the last write: usage reports, their
    CSV and the customer's usage chart. On the replica when DATABASE_READ_URL is set (read-only,
    closed at the end of the request), else the request's own session.

    Money never reads it: balances, holds, the ledger, key states and anything read right after
    the caller's own write use :func:`session`.
    """
    runtime = current_runtime()
    if runtime.replica_sessions is None:
        return session()
    if "report_session" not in g:
        g.report_session = runtime.replica_sessions()
    return g.report_session  # type: ignore[no-any-return]


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


def client_address() -> str:
    """The address the request came from (see :func:`address_of`)."""
    return address_of(request.environ)


def address_of(environ: Mapping[str, Any]) -> str:
    """The address a WSGI request came from: the TCP peer (``REMOTE_ADDR``). A proxy in front
    must pass the client's own address as the peer (README, "Client addresses")."""
    return str(environ.get("REMOTE_ADDR") or "unknown")


def authenticated(kind: str, authenticate: Callable[[], T]) -> T:
    """``authenticate()``, under the failed-authentication limit of the client address (kind:
    admin, gateway or customer): raises TooManyFailedAuthentications, without calling it, while
    the address is over the limit, and counts the attempt when it is refused with 401."""
    failures = current_runtime().auth_failures
    address = client_address()
    failures.check(kind, address)
    try:
        return authenticate()
    except BillingError as refused:
        if refused.status == 401:
            failures.failed(kind, address)
        raise
