"""API keys and the states the gateway enforces (DESIGN section 5).

Invariants:
- A key's secret is shown once, at creation or rotation; only its keyed hash is stored, and a
  lookup is one query on the unique hash index.
- A key's ``state`` is derived from facts (revoked, disabled, expiry, suspension, the account's
  available balance) by :func:`derive_state`, first matching row of the state table
  (``billing.accounts.key_states``) winning; every change of it is recorded in
  ``key_state_changes`` with its reason, in the same transaction as the fact that caused it,
  and queued for the webhook endpoints (``billing.notify.outbox``) in that transaction too.
- Each key's events (its creation, then every change) carry a ``sequence`` that increases by
  one with each: an in-place increment of ``api_keys.event_sequence``, which holds the key's
  row lock to the commit, so sequences follow commit order and none is given twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from limits import parse as parse_rate_limit
from sqlalchemy import JSON, BigInteger, CheckConstraint, ForeignKey, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.orm.attributes import set_committed_value

from billing.accounts import rollups
from billing.accounts.accounts import Account, get_account
from billing.accounts.key_states import (
    ENFORCEMENT,
    KEY_STATE_ROWS,
    SMALLEST_HOLD,
    STATE_TABLE,
    KeyFacts,
    KeyState,
    first_row,
)
from billing.catalog import catalog
from billing.core.db import Base, BigIntId
from billing.core.effects import mark_account, mark_keys_changed, mark_state_changed
from billing.core.errors import InvalidRequest, NotFound
from billing.core.ids import keyed_hash, mask, new_id, new_secret
from billing.notify import outbox

KEY_PREFIX = "sk-"


class ApiKey(Base):
    """An API key of an account; the secret itself is never stored."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            "state IN ('revoked', 'disabled', 'expired', 'suspended', 'insufficient_balance',"
            " 'monthly_quota_exceeded', 'active')",
            name="state_known",
        ),
        CheckConstraint(
            "monthly_cap_nanos IS NULL OR monthly_cap_nanos >= 0", name="cap_not_negative"
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(16))
    last4: Mapped[str] = mapped_column(String(4))
    state: Mapped[str] = mapped_column(String(32))
    rate_limit: Mapped[str | None] = mapped_column(String(100))
    monthly_cap_nanos: Mapped[int | None] = mapped_column(BigInteger)
    # Open holds of this key placed through PostgreSQL (``billing.ledger.holds``), for its
    # monthly cap.
    held_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The sequence of the key's latest event (see the module's invariants).
    event_sequence: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)
    expires_at: Mapped[dt.datetime | None]
    disabled_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    suspended_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]

    @property
    def masked(self) -> str:
        """The key as it may be displayed: ``sk-AbCd...wxyz``."""
        return f"{self.display_prefix}...{self.last4}"

    def state_at(self, now: dt.datetime) -> KeyState:
        """The state in force at ``now``: the stored state, unless the key has expired since
        and expiry comes first in the state table."""
        stored = KeyState(self.state)
        expired = self._expired(now)
        return next(
            row.state
            for row in STATE_TABLE
            if row.state is stored or (expired and row.state is KeyState.EXPIRED)
        )

    def usable(self, now: dt.datetime) -> bool:
        """Whether the key can be used at all at ``now``: its state then is not answered 401
        (a key at 402, 429 or 451 still is the caller's, and may, say, sign in to pay)."""
        return ENFORCEMENT[self.state_at(now)].http_status != 401

    def _expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class KeyStateChange(Base):
    """One change of a key's state, with why. The feed the gateway follows."""

    __tablename__ = "key_state_changes"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    old_state: Mapped[str | None] = mapped_column(String(32))
    new_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(200))
    # The key's event sequence this change was announced with.
    sequence: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime]


class KeyNotFound(NotFound):
    """No key has that id."""


class InvalidApiKey(InvalidRequest):
    """The presented secret matches no key."""

    status = 401
    code = "invalid_api_key"
    type = "invalid_request_error"


@dataclass(frozen=True)
class KeySettings:
    """What an operator may set on a key. ``None`` for an optional limit means none."""

    name: str
    rate_limit: str | None
    monthly_cap_nanos: int | None
    allowed_models: list[str] | None
    expires_at: dt.datetime | None


def key_facts(
    key: ApiKey,
    account: Account,
    now: dt.datetime,
    *,
    month_spend: int,
    hold_nanos: int | None = None,
    min_hold_nanos: int | None = None,
) -> KeyFacts:
    """``key``'s facts at ``now``; ``month_spend`` is its settled spend in the current UTC
    month. With ``hold_nanos`` (authorize), the open holds of the account and of the key count
    too, and ``min_hold_nanos`` is the smallest hold the request accepts (default: the hold);
    without, the facts are those of settled money (see ``SMALLEST_HOLD``)."""
    settled = hold_nanos is None
    hold = SMALLEST_HOLD if hold_nanos is None else hold_nanos
    return KeyFacts(
        revoked=key.revoked_at is not None,
        disabled=key.disabled_at is not None,
        expired=key._expired(now),
        suspended=key.suspended_at is not None,
        balance_nanos=account.balance_nanos,
        month_spend=month_spend,
        monthly_cap_nanos=key.monthly_cap_nanos,
        available_nanos=account.balance_nanos if settled else account.available_nanos,
        key_held_nanos=0 if settled else key.held_nanos,
        hold_nanos=hold,
        min_hold_nanos=hold if min_hold_nanos is None else min_hold_nanos,
    )


def derive_state(
    key: ApiKey, account: Account, now: dt.datetime, *, month_spend: int = 0
) -> KeyState:
    """The state the facts call for; the first applicable row of the state table wins.

    ``month_spend`` is the key's settled spend in the current UTC month, in nano-dollars. The
    state follows settled money only: a hold that does not fit is refused at authorize time
    (``billing.enforcement.authorize``) without changing the key's state, as holds come and go
    by the second.
    """
    facts = key_facts(key, account, now, month_spend=month_spend)
    state = first_row(facts, rows=KEY_STATE_ROWS).state
    assert isinstance(state, KeyState)
    return state


def refresh_state(
    session: Session, key: ApiKey, account: Account, *, reason: str, now: dt.datetime
) -> bool:
    """Re-derive ``key``'s state and record a change with ``reason``; True if it changed."""
    spend = (
        rollups.month_spend(session, [key.id], now=now) if key.monthly_cap_nanos is not None else {}
    )
    _mark_snapshots(session, [account], [key], spend, now)
    return _apply(
        session, key, derive_state(key, account, now, month_spend=spend.get(key.id, 0)), reason, now
    )


def _mark_snapshots(
    session: Session,
    accounts: Iterable[Account],
    keys: list[ApiKey],
    spend: dict[str, int],
    now: dt.datetime,
) -> None:
    """Have these fresh balances, and the month spend of their capped keys, copied to the hot
    path after commit."""
    month = rollups.month_key(now)
    capped: dict[str, dict[str, tuple[str, int]]] = {}
    for key in keys:
        if key.monthly_cap_nanos is not None:
            capped.setdefault(key.account_id, {})[key.id] = (month, spend.get(key.id, 0))
    for account in accounts:
        mark_account(
            session,
            account.id,
            version=account.balance_version,
            balance_nanos=account.balance_nanos,
            month_spend=capped.get(account.id, {}),
        )


def _apply(session: Session, key: ApiKey, new: KeyState, reason: str, now: dt.datetime) -> bool:
    if key.state == new:
        return False
    created = key.state is None  # a new key, not yet flushed: its first event
    if created:
        key.event_sequence = 1
    else:
        _next_sequence(session, key)
    sequence, enforcement = key.event_sequence, ENFORCEMENT[new]
    session.add(
        KeyStateChange(
            key_id=key.id,
            old_state=key.state,
            new_state=new,
            reason=reason,
            sequence=sequence,
            created_at=now,
        )
    )
    event = outbox.KeyEvent(
        key.id, key.account_id, new, enforcement.http_status, enforcement.code, sequence
    )
    if created:
        outbox.announce_key_created(session, event, now=now)
    else:
        outbox.announce_key_state(session, event, old_state=key.state, reason=reason, now=now)
    key.state = new
    mark_state_changed(session, key.id, new)
    return True


def _next_sequence(session: Session, key: ApiKey) -> None:
    """Move the key to its next event sequence by an in-place increment (see the invariants)."""
    sequence: int = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id)
        .values(event_sequence=ApiKey.event_sequence + 1)
        .returning(ApiKey.event_sequence)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    set_committed_value(key, "event_sequence", sequence)


def refresh_keys_of(
    session: Session, account_ids: list[str], *, reason: str, now: dt.datetime
) -> list[ApiKey]:
    """Re-derive the state of every key of these accounts from fresh balances and spend."""
    if not account_ids:
        return []
    query = select(ApiKey).where(ApiKey.account_id.in_(account_ids)).order_by(ApiKey.id)
    return _refresh(session, list(session.scalars(query)), reason=reason, now=now)


def refresh_quota_keys(session: Session, *, now: dt.datetime) -> list[ApiKey]:
    """Re-derive every key held at ``monthly_quota_exceeded`` with ``now``'s month spend; returns
    the keys that changed. Spend is summed per UTC month, so at the turn of a month these keys
    return to active (or whatever else their facts call for). Safe to run at any time."""
    query = (
        select(ApiKey).where(ApiKey.state == KeyState.MONTHLY_QUOTA_EXCEEDED).order_by(ApiKey.id)
    )
    return _refresh(session, list(session.scalars(query)), reason="monthly quota reset", now=now)


def _refresh(
    session: Session, keys: list[ApiKey], *, reason: str, now: dt.datetime
) -> list[ApiKey]:
    """Re-derive ``keys`` from their accounts' fresh balances and this month's spend."""
    if not keys:
        return []
    accounts = {
        account.id: account
        for account in session.scalars(
            select(Account)
            .where(Account.id.in_({key.account_id for key in keys}))
            .execution_options(populate_existing=True)
        )
    }
    capped = [key.id for key in keys if key.monthly_cap_nanos is not None]
    spend = rollups.month_spend(session, capped, now=now)
    _mark_snapshots(session, accounts.values(), keys, spend, now)
    return [
        key
        for key in keys
        if _apply(
            session,
            key,
            derive_state(key, accounts[key.account_id], now, month_spend=spend.get(key.id, 0)),
            reason,
            now,
        )
    ]


def validate_rate_limit(text: str) -> str:
    """``text`` if the `limits` library can parse it (``1 per 10 seconds``, ``60/minute``)."""
    try:
        parse_rate_limit(text)
    except ValueError:
        raise InvalidRequest(
            f"rate_limit {text!r} is not a rate limit such as '1 per 10 seconds' or '60/minute'.",
            param="rate_limit",
        ) from None
    return text


def _checked(
    session: Session,
    settings: KeySettings,
    now: dt.datetime,
    *,
    current_expiry: dt.datetime | None = None,
) -> KeySettings:
    if not settings.name.strip():
        raise InvalidRequest("name must not be empty.", param="name")
    if settings.rate_limit is not None:
        validate_rate_limit(settings.rate_limit)
    if settings.monthly_cap_nanos is not None and settings.monthly_cap_nanos < 0:
        raise InvalidRequest("monthly_cap_usd must not be negative.", param="monthly_cap_usd")
    allowed = None
    if settings.allowed_models is not None:
        try:
            allowed = sorted(
                {catalog.resolve_model(session, name) for name in settings.allowed_models}
            )
        except catalog.ModelNotFound as exc:
            raise catalog.ModelNotFound(exc.message, param="allowed_models") from None
    # An unchanged expiry is not re-checked: an expired key can still be renamed.
    expiry_changed = settings.expires_at != current_expiry
    if expiry_changed and settings.expires_at is not None and settings.expires_at <= now:
        raise InvalidRequest("expires_at must be in the future.", param="expires_at")
    return KeySettings(
        settings.name.strip(),
        settings.rate_limit,
        settings.monthly_cap_nanos,
        allowed,
        settings.expires_at,
    )


def issue_key(
    session: Session, *, account_id: str, settings: KeySettings, hmac_key: bytes, now: dt.datetime
) -> tuple[ApiKey, str]:
    """Create a key for the account; returns it with its secret, which is never seen again."""
    account = get_account(session, account_id)
    settings = _checked(session, settings, now)
    secret = new_secret(KEY_PREFIX)
    prefix, last4 = mask(secret)
    key = ApiKey(
        id=new_id("key"),
        account_id=account.id,
        name=settings.name,
        key_hash=keyed_hash(hmac_key, secret),
        display_prefix=prefix,
        last4=last4,
        state=None,
        rate_limit=settings.rate_limit,
        monthly_cap_nanos=settings.monthly_cap_nanos,
        held_nanos=0,
        allowed_models=settings.allowed_models,
        expires_at=settings.expires_at,
        created_at=now,
    )
    refresh_state(session, key, account, reason="created", now=now)
    session.add(key)
    session.flush()
    return key, secret


def get_key(session: Session, key_id: str) -> ApiKey:
    """The key with that id; raises KeyNotFound."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyNotFound(f"No key with id {key_id!r}.", param="key_id")
    return key


def find_key(session: Session, secret: str, *, hmac_key: bytes) -> ApiKey:
    """The key whose secret is ``secret``, by one indexed query; raises InvalidApiKey."""
    key = None
    if secret.startswith(KEY_PREFIX):
        key = session.scalars(
            select(ApiKey).where(ApiKey.key_hash == keyed_hash(hmac_key, secret))
        ).first()
    if key is None:
        raise InvalidApiKey("Incorrect API key provided.", param="api_key")
    return key


def list_keys(session: Session, account_id: str) -> list[ApiKey]:
    """The keys of an account, oldest first; raises AccountNotFound."""
    get_account(session, account_id)
    return list(
        session.scalars(select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.id))
    )


def update_key(
    session: Session, key_id: str, *, settings: KeySettings, disabled: bool | None, now: dt.datetime
) -> ApiKey:
    """Replace a key's settings and optionally disable or re-enable it; revoked keys are final."""
    key = get_key(session, key_id)
    if key.revoked_at is not None:
        raise InvalidRequest("This key is revoked; revoked keys cannot be changed.", param="key_id")
    settings = _checked(session, settings, now, current_expiry=key.expires_at)
    key.name = settings.name
    key.rate_limit = settings.rate_limit
    key.monthly_cap_nanos = settings.monthly_cap_nanos
    key.allowed_models = settings.allowed_models
    key.expires_at = settings.expires_at
    if disabled is not None:
        key.disabled_at = (key.disabled_at or now) if disabled else None
    refresh_state(
        session, key, get_account(session, key.account_id), reason="updated by an operator", now=now
    )
    # Limits the hot path enforces may have changed with the state unchanged.
    mark_keys_changed(session, [key.id])
    return key


def revoke_key(session: Session, key_id: str, *, now: dt.datetime) -> ApiKey:
    """Revoke a key for good; revoking twice is harmless."""
    key = get_key(session, key_id)
    if key.revoked_at is None:
        key.revoked_at = now
        refresh_state(
            session,
            key,
            get_account(session, key.account_id),
            reason="revoked by an operator",
            now=now,
        )
    return key


def rotate_key(
    session: Session, key_id: str, *, hmac_key: bytes, now: dt.datetime
) -> tuple[ApiKey, str]:
    """Give a key a new secret (the old one stops working at once); returns the new secret."""
    key = get_key(session, key_id)
    if key.revoked_at is not None:
        raise InvalidRequest("This key is revoked; revoked keys cannot be rotated.", param="key_id")
    secret = new_secret(KEY_PREFIX)
    key.key_hash = keyed_hash(hmac_key, secret)
    key.display_prefix, key.last4 = mask(secret)
    session.flush()
    mark_keys_changed(session, [key.id])
    return key, secret


# The key-state feed (GET /gateway/v1/key-states), for gateways that missed webhooks.

# Change ids are assigned at insert, not at commit, so a change may become visible after a
# higher id did. Readers that keep a cursor over the changes (this feed, the Redis mirror) only
# move it past changes older than this, longer than any transaction that changes key states
# runs: a cursor never moves past a change that is still to commit.
CHANGE_COMMIT_LAG = dt.timedelta(minutes=1)


def state_changes(
    session: Session, *, after: int | None, limit: int, now: dt.datetime
) -> list[tuple[KeyStateChange, str]]:
    """Up to ``limit`` changes after the change id ``after``, oldest first, each with its key's
    account id; none younger than ``CHANGE_COMMIT_LAG``, nor any after the first younger one."""
    rows = session.execute(
        select(KeyStateChange, ApiKey.account_id)
        .join(ApiKey, ApiKey.id == KeyStateChange.key_id)
        .where(KeyStateChange.id > (after or 0))
        .order_by(KeyStateChange.id)
        .limit(limit)
    ).all()
    settled = []
    for change, account_id in rows:
        if change.created_at > now - CHANGE_COMMIT_LAG:
            break
        settled.append((change, account_id))
    return settled
