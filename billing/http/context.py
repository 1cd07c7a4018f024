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
