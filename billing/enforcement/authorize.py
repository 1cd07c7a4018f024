"""Authorize: may this key make this request, and reserve its worst-case cost (DESIGN 6.1).

The checks run in the order of the state table (DESIGN section 5), the first failing one
answering: 401 invalid key, 451 suspended; then a request id that holds already is answered
with its hold (the same request) or 409 (another); then 402 insufficient balance (nothing is
available), 402 hold exceeds available (not even the smallest hold the request accepts fits),
429 monthly quota (spend this month plus the key's open holds plus this hold would pass the
cap), 429 rate limited, 403 model not allowed, 400 unknown model. A request refused for any
reason but its rate limit does not consume it.

The hold covers the input estimate (the larger of ``input_tokens`` and ``input_bytes``) and the
output tokens asked for; when that does not fit what is available, it is clipped to the most
output tokens that do, if those are at least ``HOLD_MIN_OUTPUT_TOKENS`` (unless the request
asks for all or nothing), and the granted count is answered for the gateway to pass upstream.

Two places can check and hold, with the same rules (see ``Verdict``):
- Redis (``billing.enforcement.hotpath``), when configured: one script call, no PostgreSQL;
- PostgreSQL (``billing.enforcement.postgres``): on the embedded default, and when Redis is
  down unless ``AUTHORIZE_WHEN_REDIS_DOWN=refuse`` (then 503). Never "allow everything".
Verifying a key and releasing a hold go to the same places in the same way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
from cachetools import TTLCache
from sqlalchemy.orm import Session

from billing.accounts.key_states import ENFORCEMENT, KeyState, RequestRefusal, Row
from billing.catalog import catalog
from billing.catalog.pricing import HoldTerms, Price
from billing.core.errors import BillingError
from billing.core.ids import keyed_hash, new_id
from billing.core.money import Nanos
from billing.enforcement.hotpath import NO_HOLD, HoldRequest, HotPath, KeyCheck, Verdict
from billing.enforcement.postgres import PostgresHolds
from billing.enforcement.rate_limits import RateLimits, RateWindow
from billing.ledger import holds

log = logging.getLogger(__name__)

T = TypeVar("T")
# A key or account Redis lost again as soon as it was copied: Redis is not keeping data.
_LOST = "the hot path lost the data it was just given"


class Refused(BillingError):
    """Authorize says no; the status, code and message are those of DESIGN section 5."""

    def __init__(
        self,
        status: int,
        code: str,
        type_: str,
        message: str,
        retry_after: int | None = None,
        *,
        param: str | None = None,
    ) -> None:
        super().__init__(message, param=param)
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


# Verdicts that name a row of the state table: that row answers.
_REFUSED_ROWS = frozenset(
    [state.value for state in KeyState if state is not KeyState.ACTIVE]
    + [refusal.value for refusal in RequestRefusal]
)


def _row_refusal(row: Row, retry_after: int | None = None, *, tokens: int = 0) -> Refused:
    enforcement = ENFORCEMENT[row]
    assert enforcement.code and enforcement.type and enforcement.message
    return Refused(
        enforcement.http_status,
        enforcement.code,
        enforcement.type,
        enforcement.message.format(tokens=tokens),
        retry_after,
        param=enforcement.param,
    )


def seconds_to_next_month(now: dt.datetime) -> int:
    """Whole seconds from ``now`` to the start of the next UTC month (at least 1)."""
    utc = now.astimezone(dt.UTC)
    start = dt.datetime(utc.year + utc.month // 12, utc.month % 12 + 1, 1, tzinfo=dt.UTC)
    return max(1, math.ceil((start - utc).total_seconds()))


@dataclass(frozen=True)
class AuthorizeRequest:
    """What the gateway asks about: the key, the model, the request and its size.

    The input estimate is the larger of ``input_tokens`` and ``input_bytes`` (the UTF-8 length
    of the request's text, an upper bound on the input tokens of byte-level BPE tokenizers).
    ``clip`` false asks for all of ``max_output_tokens`` or nothing.
    """

    api_key: str
    model: str
    request_id: str
    input_tokens: int = 0
    max_output_tokens: int | None = None
    input_bytes: int = 0
    clip: bool = True

    @property
    def input_estimate(self) -> int:
        """The input tokens the hold covers."""
        return max(self.input_tokens, self.input_bytes)

    def request_hash(self, model_id: str) -> str:
        """What tells this request from another under the same request id (the key aside)."""
        parameters = (
            model_id,
            self.input_tokens,
            self.input_bytes,
            self.max_output_tokens,
            self.clip,
        )
        return hashlib.sha256(repr(parameters).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Authorization:
    """A yes, with the hold placed for the request: ``output_tokens`` is what it covers (the
    gateway's upstream maximum), ``clipped`` whether that is fewer than asked for."""

    key_id: str
    account_id: str
    hold_id: str
    hold_nanos: Nanos
    available_nanos: Nanos
    expires_at: dt.datetime
    output_tokens: int = 0
    clipped: bool = False
    rate_window: RateWindow | None = None
    monthly_cap_nanos: Nanos | None = None
    month_spend_nanos: Nanos | None = None


@dataclass(frozen=True)
class KeyStatus:
    """A key that may still be used (not answered 401), as ``POST /keys/verify`` shows it."""

    key_id: str
    account_id: str
    state: KeyState
    allowed_models: list[str] | None
    rate_window: RateWindow | None


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
    min_output_tokens: int = 256

    def __post_init__(self) -> None:
        self.quotes = self.quotes or Quotes()

    def authorize(
        self, session: Opener, request: AuthorizeRequest, *, now: dt.datetime
    ) -> Authorization:
        """Check ``request`` and hold its worst-case cost, clipped if need be and allowed;
        raises Refused (or Unavailable).

        ``session`` opens the request's session when first called: the Redis path calls it
        only to reload a key or account Redis does not have. With ``session`` None, raises
        NeedsDatabase (having changed nothing) where it would be needed.
        """
        assert self.quotes is not None
        hold = self._hold(
            keyed_hash(self.hmac_key, request.api_key),
            self.quotes.get(session, request.model, now=now),
            request,
            now,
        )

        def on_redis(hotpath: HotPath) -> Verdict:
            verdict = hotpath.authorize(hold)
            if verdict.verdict == "miss":
                self._load(session, hotpath, hold.key_hash, now)
                verdict = hotpath.authorize(hold)
            if verdict.verdict == "miss":
                raise redis.RedisError(_LOST)
            return verdict

        verdict = self._on_redis(session, on_redis, "authorizing")
        rate_limits = self.rate_limits
        if verdict is None:
            rate_limits = self.fallback_rate_limits
            verdict = PostgresHolds(_opened(session), rate_limits).authorize(hold)
        return self._decide(verdict, rate_limits, request, hold, now)

    def verify(self, session: Opener, api_key: str, *, now: dt.datetime) -> KeyStatus:
        """The key's state, allowed models and rate-limit window, placing no hold and counting
        nothing; raises Refused (401) for a key that cannot be used (or Unavailable)."""
        key_hash = keyed_hash(self.hmac_key, api_key)

        def on_redis(hotpath: HotPath) -> KeyCheck:
            check = hotpath.verify(key_hash, now=now)
            if check.state == "miss":
                self._load(session, hotpath, key_hash, now)
                check = hotpath.verify(key_hash, now=now)
            if check.state == "miss":
                raise redis.RedisError(_LOST)
            return check

        check = self._on_redis(session, on_redis, "verifying")
        if check is None:
            postgres = PostgresHolds(_opened(session), self.fallback_rate_limits)
            check = postgres.verify(key_hash, now=now)
        state = KeyState.REVOKED if check.state == "invalid" else KeyState(check.state)
        if ENFORCEMENT[state].http_status == 401:
            raise _row_refusal(state)
        return KeyStatus(
            check.key_id, check.account_id, state, check.allowed_models, check.rate_window
        )

    def release(
        self, session: Opener, hold_id: str, *, now: dt.datetime
    ) -> tuple[holds.HoldStatus, Nanos]:
        """Release the hold ``hold_id`` if it is open, wherever it was placed; returns its status
        and the amount released (0 if it was closed already). Raises holds.HoldNotFound, or
        Unavailable when Redis is down and the hold is not PostgreSQL's.

        Releasing only ever frees money, so PostgreSQL's holds are released even where
        authorize is configured to refuse while Redis is down.
        """
        redis_down = False
        if self.hotpath is not None:
            try:
                answered = self.hotpath.release_hold(hold_id)
            except redis.RedisError as exc:
                if session is None:
                    raise NeedsDatabase from exc
                log.warning("Redis unavailable, releasing through PostgreSQL: %s", exc)
                redis_down = True
            else:
                if answered is not None:
                    return holds.HoldStatus(answered[0]), answered[1]
        try:
            return holds.release_hold(_opened(session), hold_id, now=now)
        except holds.HoldNotFound:
            if redis_down:
                raise Unavailable(
                    "Redis is down and the hold is not PostgreSQL's; retry shortly."
                ) from None
            raise

    def _on_redis(self, session: Opener, attempt: Callable[[HotPath], T], doing: str) -> T | None:
        """``attempt`` on the hot path; None when there is none or it is down and PostgreSQL
        answers instead (raises Unavailable if configured to refuse, NeedsDatabase if there is
        no session to fall back with)."""
        if self.hotpath is None:
            return None
        try:
            return attempt(self.hotpath)
        except redis.RedisError as exc:
            if session is None:
                raise NeedsDatabase from exc
            if not self.fall_back_to_postgres:
                raise Unavailable(
                    "Authorization is unavailable (Redis is down); retry shortly."
                ) from exc
            log.warning("Redis unavailable, %s through PostgreSQL: %s", doing, exc)
            return None

    @staticmethod
    def _load(session: Opener, hotpath: HotPath, key_hash: str, now: dt.datetime) -> None:
        """Copy a key Redis lacks, and its account, from PostgreSQL (an unknown secret is
        remembered as such); raises RedisError if Redis loses it again at once."""
        hotpath.load(_opened(session), key_hash, now=now)

    def _hold(
        self,
        key_hash: str,
        quote: Quote | None,
        request: AuthorizeRequest,
        now: dt.datetime,
    ) -> HoldRequest:
        terms, model_id, request_hash = NO_HOLD, None, ""
        if quote is not None:
            output_tokens = (
                request.max_output_tokens
                or quote.max_output_tokens
                or self.default_max_output_tokens
            )
            terms = HoldTerms.of(
                quote.price,
                input_tokens=request.input_estimate,
                output_tokens=output_tokens,
                min_output_tokens=self.min_output_tokens if request.clip else output_tokens,
            )
            model_id = quote.model_id
            request_hash = request.request_hash(model_id)
        return HoldRequest(
            key_hash=key_hash,
            model_id=model_id,
            request_id=request.request_id,
            hold_id=new_id("hold"),
            now=now,
            expires_at=now + self.hold_ttl,
            terms=terms,
            request_hash=request_hash,
        )

    def _decide(
        self,
        verdict: Verdict,
        rate_limits: RateLimits,
        request: AuthorizeRequest,
        hold: HoldRequest,
        now: dt.datetime,
    ) -> Authorization:
        outcome = verdict.verdict
        if outcome == "invalid":  # a secret of no key, answered as the 401 rows are
            raise _row_refusal(KeyState.REVOKED)
        if outcome == KeyState.MONTHLY_QUOTA_EXCEEDED:
            raise _row_refusal(KeyState.MONTHLY_QUOTA_EXCEEDED, seconds_to_next_month(now))
        if outcome == RequestRefusal.HOLD_EXCEEDS_AVAILABLE:
            raise _row_refusal(RequestRefusal(outcome), tokens=verdict.affordable_tokens)
        if outcome in _REFUSED_ROWS:
            raise _row_refusal(KeyState(outcome))
        if outcome == "request_id_conflict":
            raise Refused(
                409,
                "request_id_conflict",
                "invalid_request_error",
                f"request_id {request.request_id!r} already holds for a request with other"
                " parameters (key, model, input_tokens, input_bytes, max_output_tokens or"
                " clip); every upstream request needs a request id of its own.",
                param="request_id",
            )
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
        asked = hold.terms.output_tokens
        # A hold placed before holds kept their output tokens covered all that was asked.
        granted = verdict.output_tokens or asked
        return Authorization(
            key_id=verdict.key_id,
            account_id=verdict.account_id,
            hold_id=verdict.hold_id,
            hold_nanos=verdict.amount_nanos,
            available_nanos=verdict.available_nanos,
            expires_at=now + self.hold_ttl,
            output_tokens=granted,
            clipped=granted < asked,
            rate_window=verdict.rate_window,
            monthly_cap_nanos=verdict.monthly_cap_nanos,
            month_spend_nanos=verdict.month_spend_nanos,
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
