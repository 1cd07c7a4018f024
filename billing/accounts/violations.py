"""Content-policy violations reported by the gateway, and the suspension they lead to
(DESIGN sections 5 and 6.3).

Invariants:
- Every report is recorded, once: a key's request id is unique (a unique index), so a gateway
  retrying a report gets the original back as a duplicate, which never counts twice.
- A key is suspended (``api_keys.suspended_at``, answered 451) when at least ``threshold`` of its
  uncleared violations were reported within the ``window`` ending at the report; the count is
  taken under a lock on the key row, so concurrent reports cannot all miss the threshold.
- Clearing a suspension marks the key's violations cleared (they stay listed) and only uncleared
  ones count, so a cleared key is not suspended again by the reports that suspended it.
- The key's state is re-derived (``billing.accounts.keys``) in the same transaction as the
  fact, so the change is recorded, mirrored and announced like any other.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from billing.accounts import keys
from billing.accounts.accounts import get_account
from billing.accounts.keys import ApiKey
from billing.core.db import Base, BigIntId, newest_first
from billing.core.errors import BillingError, InvalidRequest
from billing.core.ids import keyed_hash

MAX_DETAIL = 2000


class Violation(Base):
    """One content-policy violation the gateway reported for a request made with a key."""

    __tablename__ = "violations"
    __table_args__ = (
        UniqueConstraint("key_id", "request_id", name="uq_violations_key_id_request_id"),
        Index("ix_violations_key_id_reported_at", "key_id", "reported_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    request_id: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(MAX_DETAIL))
    reported_at: Mapped[dt.datetime]
    cleared_at: Mapped[dt.datetime | None]


class UnknownKey(BillingError):
    """The report names a key we do not know."""

    status = 400
    code = "invalid_api_key"


@dataclass(frozen=True)
class Policy:
    """When violations suspend a key: ``threshold`` of them within ``window``."""

    threshold: int
    window: dt.timedelta


@dataclass(frozen=True)
class Reported:
    """The outcome of a report: the violation (the original one for a duplicate) and its key."""

    violation: Violation
    key: ApiKey
    duplicate: bool


def _locked_key(
    session: Session, *, api_key: str | None, key_id: str | None, hmac_key: bytes
) -> ApiKey:
    if (api_key is None) == (key_id is None):
        raise InvalidRequest("Send exactly one of api_key and key_id.", param="api_key")
    # The key row is the lock that serialises the reports (and the clearing) of one key.
    query = select(ApiKey).with_for_update()
    if api_key is not None:
        query = query.where(ApiKey.key_hash == keyed_hash(hmac_key, api_key))
    else:
        query = query.where(ApiKey.id == key_id)
    key = session.scalars(query.execution_options(populate_existing=True)).first()
    if key is None:
        param = "api_key" if api_key is not None else "key_id"
        raise UnknownKey(f"{param} names no key.", param=param)
    return key


def report(
    session: Session,
    *,
    request_id: str,
    api_key: str | None = None,
    key_id: str | None = None,
    category: str,
    detail: str | None,
    policy: Policy,
    hmac_key: bytes,
    now: dt.datetime,
) -> Reported:
    """Record a violation reported at ``now`` and suspend its key if it reaches the threshold.

    Name the key by its secret or its id (exactly one); raises UnknownKey or InvalidRequest.
    A repeat of a key's request id answers the first report as a duplicate.
    """
    key = _locked_key(session, api_key=api_key, key_id=key_id, hmac_key=hmac_key)
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    inserted = session.scalar(
        dialect.insert(Violation)
        .values(
            key_id=key.id,
            account_id=key.account_id,
            request_id=request_id,
            category=category,
            detail=detail,
            reported_at=now,
        )
        .on_conflict_do_nothing(index_elements=["key_id", "request_id"])
        .returning(Violation.id)
    )
    violation = session.scalars(
        select(Violation).where(Violation.key_id == key.id, Violation.request_id == request_id)
    ).one()
    if inserted is None:
        return Reported(violation, key, duplicate=True)
    if key.suspended_at is None:
        count = recent_count(session, key.id, window=policy.window, now=now)
        if count >= policy.threshold:
            key.suspended_at = now
            keys.refresh_state(
                session,
                key,
                get_account(session, key.account_id),
                reason=f"{count} content violations in {_duration(policy.window)}",
                now=now,
            )
    return Reported(violation, key, duplicate=False)


def recent_count(session: Session, key_id: str, *, window: dt.timedelta, now: dt.datetime) -> int:
    """The key's uncleared violations reported within ``window`` up to ``now``."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Violation)
            .where(
                Violation.key_id == key_id,
                Violation.cleared_at.is_(None),
                Violation.reported_at > now - window,
                Violation.reported_at <= now,
            )
        )
        or 0
    )


def clear(session: Session, key_id: str, *, now: dt.datetime) -> ApiKey:
    """Lift a key's suspension and clear its violations; the key takes the state its other facts
    call for. Clearing a key that is not suspended is harmless. Raises KeyNotFound."""
    key = session.scalars(
        select(ApiKey)
        .where(ApiKey.id == key_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if key is None:
        raise keys.KeyNotFound(f"No key with id {key_id!r}.", param="key_id")
    session.execute(
        update(Violation)
        .where(Violation.key_id == key.id, Violation.cleared_at.is_(None))
        .values(cleared_at=now)
    )
    if key.suspended_at is not None:
        key.suspended_at = None
        keys.refresh_state(
            session,
            key,
            get_account(session, key.account_id),
            reason="violations cleared by an operator",
            now=now,
        )
    return key


def list_violations(
    session: Session, key_id: str, *, before: int | None, limit: int
) -> list[Violation]:
    """A key's violations, newest first, starting before the violation id ``before``; raises
    KeyNotFound."""
    keys.get_key(session, key_id)
    query = select(Violation).where(Violation.key_id == key_id)
    return list(session.scalars(newest_first(query, Violation.id, before=before, limit=limit)))


def _duration(window: dt.timedelta) -> str:
    hours = window.total_seconds() / 3600
    return f"{hours:g}h"
