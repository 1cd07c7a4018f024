"""Authorize: may this key make this request, and reserve its worst-case cost (DESIGN 6.1).

The checks run in the order of the state table (DESIGN section 5), the first failing one
answering: 401 invalid key, 451 suspended, 402 insufficient balance (the balance is spent, or
the hold does not fit what is available), 429 monthly quota (spend this month plus the key's
open holds plus this hold would pass the cap), 429 rate limited, 403 model not allowed, 400
unknown model. A request refused for any reason but its rate limit does not consume it.

Two places can check and hold, with the same rules (see ``Verdict``):
- Redis (``billing.enforcement.hotpath``), when configured: one script call, no PostgreSQL;
- PostgreSQL (``PostgresHolds``): on the embedded default, and when Redis is down unless
  ``AUTHORIZE_WHEN_REDIS_DOWN=refuse`` (then 503). Never "allow everything".
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import redis
from cachetools import TTLCache
from limits import RateLimitItem, parse
from limits.storage import Storage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts import rollups
from billing.accounts.accounts import Account
from billing.accounts.key_states import ENFORCEMENT, KeyState, first_row
from billing.accounts.keys import ApiKey, key_facts
from billing.catalog import catalog
from billing.catalog.pricing import Price, worst_case_cost
from billing.core.errors import BillingError
from billing.core.ids import keyed_hash, new_id
from billing.core.money import Nanos
from billing.enforcement.hotpath import HoldRequest, HotPath, Verdict
from billing.ledger import holds

log = logging.getLogger(__name__)


class Refused(BillingError):
    """Authorize says no; the status, code and message are those of DESIGN section 5."""

    def __init__(
        self, status: int, code: str, type_: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type_
        self.retry_after = retry_after


class NeedsDatabase(Exception):
    """Authorize cannot answer from memory and Redis alone; call it again with a session."""


class Unavailable(BillingError):
    """Redis is down and the configuration says to refuse rather than fall back."""

    status = 503
    code = "service_unavailable"
    type = "server_error"


# Verdicts that name a key state: that state's row of the table answers.
_REFUSED_STATES = frozenset(state.value for state in KeyState if state is not KeyState.ACTIVE)


def _state_refusal(state: KeyState, retry_after: int | None = None) -> Refused:
    enforcement = ENFORCEMENT[state]
    assert enforcement.code and enforcement.type and enforcement.message
    return Refused(
        enforcement.http_status,
        enforcement.code,
        enforcement.type,
        enforcement.message,
        retry_after,
    )


def seconds_to_next_month(now: dt.datetime) -> int:
    """Whole seconds from ``now`` to the start of the next UTC month (at least 1)."""
    utc = now.astimezone(dt.UTC)
    start = dt.datetime(utc.year + utc.month // 12, utc.month % 12 + 1, 1, tzinfo=dt.UTC)
    return max(1, math.ceil((start - utc).total_seconds()))


@dataclass(frozen=True)
class AuthorizeRequest:
    """What the gateway asks about: the key, the model, the request and its size."""

    api_key: str
    model: str
    request_id: str
    input_tokens: int = 0
    max_output_tokens: int | None = None


@dataclass(frozen=True)
class Authorization:
    """A yes, with the hold placed for the request."""

    key_id: str
    account_id: str
    hold_id: str
    hold_nanos: Nanos
    available_nanos: Nanos
    expires_at: dt.datetime


@dataclass(frozen=True)
class Quote:
    """What a model's hold is computed from."""

    model_id: str
    price: Price
    max_output_tokens: int | None


Opener = Callable[[], Session] | None
"""Opens the request's session when called; None where there is none (billing.api.hot)."""


def _opened(session: Opener) -> Session:
    if session is None:
        raise NeedsDatabase
    return session()


class Quotes:
    """Model names resolved to their current price, remembered for ``ttl`` seconds per process.

    A hold is an estimate, so a price change may take ``ttl`` seconds to reach it; settlement
    always charges the exact price. Unknown names are not remembered: a model added is usable
    at once.
    """

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        # Only names of priced models are remembered, so the bound is never reached in practice.
        self._quotes: TTLCache[str, Quote] = TTLCache(maxsize=4096, ttl=ttl)
        # cachetools' caches are not thread-safe; the lookup itself runs outside the lock.
        self._lock = threading.Lock()

    def get(self, session: Opener, name: str, *, now: dt.datetime) -> Quote | None:
        """The quote for ``name``, or None if it names no model with a price now; raises
        NeedsDatabase if it must be looked up and ``session`` is None."""
        with self._lock:
            cached = self._quotes.get(name)
        if cached is not None:
            return cached
        database = _opened(session)
        try:
            model_id = catalog.resolve_model(database, name)
        except catalog.ModelNotFound:
            return None
        version = catalog.price_version_at(database, model_id, now)
        if version is None:
            return None
        quote = Quote(model_id, version.price, version.max_output_tokens)
        with self._lock:
            self._quotes[name] = quote
        return quote


@lru_cache(maxsize=1024)
def _rate(text: str) -> RateLimitItem:
    return parse(text)


class RateLimits:
    """Per-key rate limits (the `limits` library's moving window) in one storage."""

    def __init__(self, storage: Storage) -> None:
        self._limiter = MovingWindowRateLimiter(storage)

    def hit(self, rate_limit: str, key_id: str) -> bool:
        """Count a request; False (and nothing counted) if the limit is reached."""
        return self._limiter.hit(_rate(rate_limit), key_id)

    def test(self, rate_limit: str, key_id: str) -> bool:
        """Whether a request would be allowed now, counting nothing."""
        return self._limiter.test(_rate(rate_limit), key_id)

    def retry_after(self, rate_limit: str, key_id: str) -> int:
        """Whole seconds until the next request may be allowed (at least 1)."""
        reset = self._limiter.get_window_stats(_rate(rate_limit), key_id).reset_time
        return max(1, math.ceil(reset - time.time()))


class PostgresHolds:
    """The checks of ``lua/authorize.lua`` on PostgreSQL (or SQLite), holds in ``holds``, rate
    limits in ``rate_limits``: the state table walked with the key's stored state and the
    facts at hand, then the rate limit and the model."""

    def __init__(self, session: Session, rate_limits: RateLimits) -> None:
        self.session = session
        self.rate_limits = rate_limits

    def authorize(self, hold: HoldRequest) -> Verdict:
        """Check the key and, for a known model, place the hold if it fits."""
        session = self.session
        now = hold.now
        amount_nanos = hold.amount_nanos
        key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hold.key_hash)).first()
        if key is None:
            return Verdict("invalid")

        def answer(verdict: str, available: int | None = None) -> Verdict:
            return Verdict(verdict, key.id, key.account_id, key.rate_limit or "", available)

        account = session.get_one(Account, key.account_id)
        available = account.available_nanos
        spend = 0
        if key.monthly_cap_nanos is not None:
            spend = rollups.month_spend(session, [key.id], now=now).get(key.id, 0)
        facts = key_facts(key, account, now, month_spend=spend, hold_nanos=amount_nanos)
        state = first_row(facts, stored=key.state_at(now)).state
        if state is not KeyState.ACTIVE:
            return answer(state.value, available)
        limit = key.rate_limit
        if limit and not self.rate_limits.test(limit, key.id):
            return answer("rate_limited", available)
        if hold.model_id is None:
            return answer("checked", available)
        if key.allowed_models is not None and hold.model_id not in key.allowed_models:
            return answer("model_not_allowed", available)
        try:
            placed = holds.place(
                session,
                key=key,
                hold_id=hold.hold_id,
                model_id=hold.model_id,
                request_id=hold.request_id,
                amount_nanos=amount_nanos,
                month_spend=spend,
                ttl=hold.expires_at - now,
                now=now,
            )
        except holds.QuotaExceeded:  # a concurrent hold took the rest of the cap
            return answer("monthly_quota_exceeded", available)
        if placed is None:  # a concurrent hold took the rest of the balance
            return answer("insufficient_balance", available)
        row, left = placed
        placed_now = row.id == hold.hold_id  # not the hold of an earlier call with this id
        if placed_now and limit and not self.rate_limits.hit(limit, key.id):
            # A concurrent request took the last place in the window.
            holds.release(session, [hold.request_id], reason="rate limited", now=now)
            return answer("rate_limited", available)
        return Verdict(
            "held", key.id, key.account_id, key.rate_limit or "", left, row.id, row.amount_nanos
        )


@dataclass
class Authorizer:
    """Authorize for one process: where holds go, the rate limits, the model quotes."""

    hmac_key: bytes
    hold_ttl: dt.timedelta
    default_max_output_tokens: int
    hotpath: HotPath | None
    rate_limits: RateLimits
    fallback_rate_limits: RateLimits
    fall_back_to_postgres: bool = True
    quotes: Quotes | None = None

    def __post_init__(self) -> None:
        self.quotes = self.quotes or Quotes()

    def authorize(
        self, session: Opener, request: AuthorizeRequest, *, now: dt.datetime
    ) -> Authorization:
        """Check ``request`` and hold its worst-case cost; raises Refused (or Unavailable).

        ``session`` opens the request's session when first called: the Redis path calls it
        only to reload a key or account Redis does not have. With ``session`` None, raises
        NeedsDatabase (having changed nothing) where it would be needed.
        """
        assert self.quotes is not None
        quote = self.quotes.get(session, request.model, now=now)
        amount = 0
        if quote is not None:
            max_output = (
                request.max_output_tokens
                or quote.max_output_tokens
                or self.default_max_output_tokens
            )
            amount = worst_case_cost(
                quote.price, input_tokens=request.input_tokens, max_output_tokens=max_output
            )
        key_hash = keyed_hash(self.hmac_key, request.api_key)
        if self.hotpath is not None:
            try:
                return self._decide(
                    self._from_redis(session, self.hotpath, key_hash, quote, amount, request, now),
                    self.rate_limits,
                    request,
                    now,
                )
            except redis.RedisError as exc:
                if session is None:
                    raise NeedsDatabase from exc
                if not self.fall_back_to_postgres:
                    raise Unavailable(
                        "Authorization is unavailable (Redis is down); retry shortly."
                    ) from exc
                log.warning("Redis unavailable, authorizing through PostgreSQL: %s", exc)
        postgres = PostgresHolds(_opened(session), self.fallback_rate_limits)
        verdict = postgres.authorize(self._hold(key_hash, quote, amount, request, now))
        return self._decide(verdict, self.fallback_rate_limits, request, now)

    def _hold(
        self,
        key_hash: str,
        quote: Quote | None,
        amount: int,
        request: AuthorizeRequest,
        now: dt.datetime,
    ) -> HoldRequest:
        return HoldRequest(
            key_hash=key_hash,
            model_id=quote.model_id if quote else None,
            amount_nanos=amount,
            request_id=request.request_id,
            hold_id=new_id("hold"),
            now=now,
            expires_at=now + self.hold_ttl,
        )

    def _from_redis(
        self,
        session: Opener,
        hotpath: HotPath,
        key_hash: str,
        quote: Quote | None,
        amount: int,
        request: AuthorizeRequest,
        now: dt.datetime,
    ) -> Verdict:
        hold = self._hold(key_hash, quote, amount, request, now)
        verdict = hotpath.authorize(hold)
        if verdict.verdict != "miss":
            return verdict
        if not hotpath.load(_opened(session), key_hash, now=now):
            return Verdict("invalid")
        verdict = hotpath.authorize(hold)
        if verdict.verdict == "miss":  # evicted again at once: Redis is not keeping data
            raise redis.RedisError("the hot path lost the data it was just given")
        return verdict

    def _decide(
        self,
        verdict: Verdict,
        rate_limits: RateLimits,
        request: AuthorizeRequest,
        now: dt.datetime,
    ) -> Authorization:
        outcome = verdict.verdict
        if outcome == "invalid":  # a secret of no key, answered as the 401 rows are
            raise _state_refusal(KeyState.REVOKED)
        if outcome == KeyState.MONTHLY_QUOTA_EXCEEDED:
            raise _state_refusal(KeyState.MONTHLY_QUOTA_EXCEEDED, seconds_to_next_month(now))
        if outcome in _REFUSED_STATES:
            raise _state_refusal(KeyState(outcome))
        if outcome == "rate_limited":
            raise self._rate_limited(rate_limits, verdict.rate_limit, verdict.key_id)
        if outcome == "model_not_allowed":
            raise Refused(
                403,
                "model_not_allowed",
                "invalid_request_error",
                f"This key may not use the model {request.model!r}.",
            )
        if outcome == "checked":
            raise Refused(
                400,
                "model_not_found",
                "invalid_request_error",
                f"The model {request.model!r} does not exist or has no price.",
            )
        assert outcome == "held" and verdict.available_nanos is not None, outcome
        return Authorization(
            key_id=verdict.key_id,
            account_id=verdict.account_id,
            hold_id=verdict.hold_id,
            hold_nanos=verdict.amount_nanos,
            available_nanos=verdict.available_nanos,
            expires_at=now + self.hold_ttl,
        )

    @staticmethod
    def _rate_limited(rate_limits: RateLimits, limit: str, key_id: str) -> Refused:
        return Refused(
            429,
            "rate_limit_exceeded",
            "requests",
            f"Rate limit reached for this key ({limit}).",
            rate_limits.retry_after(limit, key_id),
        )
