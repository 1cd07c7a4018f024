"""Service tokens: the bearer credentials of operators (admin) and gateways.

Tokens are shown once and stored only as keyed hashes (DESIGN invariant 7). A bootstrap token
per role may also come from the environment (``BILLING_ADMIN_TOKEN``, ``BILLING_GATEWAY_TOKEN``);
it is compared in constant time and never stored.
"""

from __future__ import annotations

import datetime as dt
import enum
import hmac
import threading
from collections.abc import Callable

from cachetools import TTLCache
from sqlalchemy import CheckConstraint, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.core.db import Base
from billing.core.errors import BillingError, InvalidRequest, NotFound
from billing.core.ids import keyed_hash, mask, new_id, new_secret


class Role(enum.StrEnum):
    """What a service token may do."""

    ADMIN = "admin"
    GATEWAY = "gateway"


TOKEN_PREFIX = {Role.ADMIN: "adm_", Role.GATEWAY: "gw_"}


class ServiceToken(Base):
    """A hashed bearer token for the admin API or the gateway API."""

    __tablename__ = "service_tokens"
    __table_args__ = (CheckConstraint("role IN ('admin', 'gateway')", name="role_known"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    last4: Mapped[str] = mapped_column(String(4))
    created_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]


class Unauthenticated(BillingError):
    """No credential, or one that matches nothing valid for this API."""

    status = 401
    code = "invalid_api_key"
    type = "invalid_request_error"


def create_token(
    session: Session, *, role: Role, name: str, hmac_key: bytes, now: dt.datetime
) -> tuple[ServiceToken, str]:
    """Create a token; returns it with its secret, which is never seen again."""
    if not name.strip():
        raise InvalidRequest("name must not be empty.", param="name")
    secret = new_secret(TOKEN_PREFIX[role])
    prefix, last4 = mask(secret)
    token = ServiceToken(
        id=new_id("tok"),
        role=role,
        name=name.strip(),
        token_hash=keyed_hash(hmac_key, secret),
        display_prefix=prefix,
        last4=last4,
        created_at=now,
    )
    session.add(token)
    session.flush()
    return token, secret


def authenticate(
    session: Session, presented: str | None, *, role: Role, bootstrap: str | None, hmac_key: bytes
) -> str:
    """The actor behind ``presented`` (a token id, or ``bootstrap``); raises Unauthenticated."""
    if not presented:
        raise Unauthenticated(
            "Missing bearer token: send 'Authorization: Bearer <token>'.", param="Authorization"
        )
    if bootstrap and hmac.compare_digest(presented.encode(), bootstrap.encode()):
        return f"{role}:bootstrap"
    token_id = session.scalar(
        select(ServiceToken.id).where(
            ServiceToken.token_hash == keyed_hash(hmac_key, presented),
            ServiceToken.role == role,
            ServiceToken.revoked_at.is_(None),
        )
    )
    if token_id is None:
        raise Unauthenticated(f"Invalid {role} token.", param="Authorization")
    return token_id


class ActorCache:
    """Authentications remembered for ``ttl`` seconds, so that a hot route (authorize) does not
    query PostgreSQL per request. A revoked token is refused at once by the process that revoked
    it (``clear``) and within ``ttl`` seconds by the others. At most ``maxsize`` tokens are
    remembered (the least recently used go first); one process's request threads share it."""

    def __init__(self, ttl: float = 10.0, maxsize: int = 1024) -> None:
        self._actors: TTLCache[tuple[Role, str], str] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._lock = threading.Lock()

    def authenticate(
        self,
        session: Callable[[], Session],
        presented: str | None,
        *,
        role: Role,
        bootstrap: str | None,
        hmac_key: bytes,
    ) -> str:
        """As :func:`authenticate`, answered from memory while fresh."""
        actor = self.cached(presented, role=role)
        if actor is not None:
            return actor
        actor = authenticate(
            session(), presented, role=role, bootstrap=bootstrap, hmac_key=hmac_key
        )
        assert presented is not None
        with self._lock:
            self._actors[(role, presented)] = actor
        return actor

    def cached(self, presented: str | None, *, role: Role) -> str | None:
        """The actor behind ``presented`` if it was accepted within ``ttl`` seconds, else None."""
        if not presented:
            return None
        with self._lock:
            return self._actors.get((role, presented))

    def clear(self) -> None:
        """Forget every remembered authentication (after a revocation)."""
        with self._lock:
            self._actors.clear()


class TokenNotFound(NotFound):
    """No token of that role has that id."""


def list_tokens(session: Session, *, role: Role) -> list[ServiceToken]:
    """Every token of ``role``, oldest first."""
    query = select(ServiceToken).where(ServiceToken.role == role).order_by(ServiceToken.id)
    return list(session.scalars(query))


def revoke_token(session: Session, token_id: str, *, role: Role, now: dt.datetime) -> ServiceToken:
    """Revoke a token for good; revoking twice is harmless. Raises TokenNotFound."""
    token = session.get(ServiceToken, token_id)
    if token is None or token.role != role:
        raise TokenNotFound(f"No {role} token with id {token_id!r}.", param="token_id")
    token.revoked_at = token.revoked_at or now
    return token
