"""Sessions of the customer page (``/billing``), kept on the server.

Invariants:
- The browser holds only a random token; only its keyed hash is stored (as for API keys), so
  the table signs nobody in. Each sign-in starts a new session: the token that asked for it,
  and whatever it held, are dead after.
- A session ends when it is signed out, idle past ``Lifetimes.idle``, older than
  ``Lifetimes.absolute``, or when the key it was signed in with is refused with 401 (revoked,
  disabled, expired), was refused at any moment since the sign-in (disabled, then enabled
  again), or has had its secret rotated. An ended session is never resumed: :func:`resume`
  deletes it when it sees it, :func:`purge` removes those nobody came back for.
- Rows are changed by plain statements, never through loaded objects, so two requests of one
  session (a poll and a sign-out) never fail on a row the other has just deleted.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, delete, exists, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.accounts.key_states import ENFORCEMENT
from billing.accounts.keys import ApiKey, KeyStateChange
from billing.core.db import Base
from billing.core.ids import keyed_hash

# secrets.token_urlsafe(32): 43 characters of [A-Za-z0-9_-]. Anything else is no token of ours,
# refused before it costs a query.
TOKEN_BYTES = 32
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
# last_seen_at is written at most this often: idle expiry needs no finer grain.
TOUCH_EVERY = dt.timedelta(minutes=1)
PURGE_BATCH = 1000
REFUSED_STATES = [state.value for state, rule in ENFORCEMENT.items() if rule.http_status == 401]


class PageSession(Base):
    """A session of the customer page: anonymous (its CSRF token only) or signed in with a key."""

    __tablename__ = "page_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    # The key's hash at sign-in: a rotated key no longer matches, and its sessions end.
    key_hash: Mapped[str | None] = mapped_column(String(64))
    # What the page keeps between requests (Flask's session: the CSRF token); no identity.
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(index=True)
    last_seen_at: Mapped[dt.datetime] = mapped_column(index=True)


@dataclass(frozen=True)
class Lifetimes:
    """How long a session lives: unused (``idle``), and at most (``absolute``)."""

    idle: dt.timedelta
    absolute: dt.timedelta

    def alive(self, row: PageSession, now: dt.datetime) -> bool:
        """Whether ``row`` is within both lifetimes at ``now``."""
        return now - row.last_seen_at < self.idle and now - row.created_at < self.absolute

    def ends_at(self, row: PageSession) -> dt.datetime:
        """The latest ``row`` can live, if it is kept in use."""
        return row.created_at + self.absolute


def start(
    db: Session,
    *,
    key: ApiKey | None,
    data: dict[str, Any],
    hmac_key: bytes,
    lifetimes: Lifetimes,
    now: dt.datetime,
) -> tuple[PageSession, str]:
    """A new session, signed in with ``key`` (or not yet, with None), holding ``data``; returns
    it and the token for the browser. Ended sessions are purged on the way."""
    purge(db, lifetimes=lifetimes, now=now)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    row = PageSession(
        token_hash=keyed_hash(hmac_key, token),
        key_id=None if key is None else key.id,
        key_hash=None if key is None else key.key_hash,
        data=data,
        created_at=now,
        last_seen_at=now,
    )
    db.add(row)
    db.flush()
    db.expunge(row)  # written to by statements only (see the module's invariants)
    return row, token


def resume(
    db: Session, token: str, *, hmac_key: bytes, lifetimes: Lifetimes, now: dt.datetime
) -> tuple[PageSession, ApiKey | None] | None:
    """The live session of ``token`` with the key it is signed in with (None: not signed in);
    None if there is no such session or it has ended, which deletes it."""
    if not TOKEN.fullmatch(token):
        return None
    row = db.get(PageSession, keyed_hash(hmac_key, token))
    if row is None:
        return None
    db.expunge(row)
    key = None if row.key_id is None else db.get(ApiKey, row.key_id)
    if not lifetimes.alive(row, now) or not _key_good(db, row, key, now):
        end(db, row)
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        db.execute(
            update(PageSession)
            .where(PageSession.token_hash == row.token_hash)
            .values(last_seen_at=now)
        )
        row.last_seen_at = now
    return row, key


def _key_good(db: Session, row: PageSession, key: ApiKey | None, now: dt.datetime) -> bool:
    """Whether the session's key still signs it in at ``now``: usable, the same secret, and
    never refused since the sign-in (True for a session not signed in)."""
    if row.key_id is None:
        return True
    if key is None or key.key_hash != row.key_hash or not key.usable(now):
        return False
    refused_since = exists().where(
        KeyStateChange.key_id == key.id,
        KeyStateChange.created_at >= row.created_at,
        KeyStateChange.new_state.in_(REFUSED_STATES),
    )
    return not db.scalar(select(refused_since))


def save_data(db: Session, row: PageSession, data: dict[str, Any]) -> None:
    """Store ``data`` as the session's (nothing, if it has ended meanwhile)."""
    db.execute(
        update(PageSession).where(PageSession.token_hash == row.token_hash).values(data=data)
    )
    row.data = data


def end(db: Session, row: PageSession) -> None:
    """End the session: its token signs nothing in any more (ending twice is harmless)."""
    db.execute(delete(PageSession).where(PageSession.token_hash == row.token_hash))


def purge(db: Session, *, lifetimes: Lifetimes, now: dt.datetime) -> int:
    """Delete up to ``PURGE_BATCH`` ended sessions; returns how many. Rows another transaction
    holds are skipped, so concurrent purges never wait on each other."""
    ended = (
        select(PageSession.token_hash)
        .where(
            or_(
                PageSession.last_seen_at <= now - lifetimes.idle,
                PageSession.created_at <= now - lifetimes.absolute,
            )
        )
        .limit(PURGE_BATCH)
        .with_for_update(skip_locked=True)
    )
    result = db.execute(
        delete(PageSession)
        .where(PageSession.token_hash.in_(ended.scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
