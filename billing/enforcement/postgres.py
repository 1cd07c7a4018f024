"""Authorize on PostgreSQL (or SQLite): the checks of ``lua/authorize.lua`` and
``lua/verify.lua`` with holds in ``holds`` (``billing.ledger.holds``) and rate limits in one
process's memory. Used on the embedded default, and when Redis is down unless
``AUTHORIZE_WHEN_REDIS_DOWN=refuse``.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.accounts import rollups
from billing.accounts.accounts import Account
from billing.accounts.key_states import STANDING, KeyState, RequestRefusal, first_row
from billing.accounts.keys import ApiKey, key_facts
from billing.enforcement.hotpath import HoldRequest, KeyCheck, Verdict
from billing.enforcement.rate_limits import RateLimits
from billing.ledger import holds


class PostgresHolds:
    """The state table walked with the key's stored state and the facts at hand, then the
    request id's earlier hold, the rate limit and the model, holding through PostgreSQL."""

    def __init__(self, session: Session, rate_limits: RateLimits) -> None:
        self.session = session
        self.rate_limits = rate_limits

    def _key(self, key_hash: str) -> ApiKey | None:
        return self.session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()

    def authorize(self, hold: HoldRequest) -> Verdict:
        """Check the key and, for a known model, place the hold if it fits (clipped if the
        terms allow)."""
        session = self.session
        now = hold.now
        terms = hold.terms
        key = self._key(hold.key_hash)
        if key is None:
            return Verdict("invalid")
        account = session.get_one(Account, key.account_id)
        available = account.available_nanos
        spend = 0
        if key.monthly_cap_nanos is not None:
            spend = rollups.month_spend(session, [key.id], now=now).get(key.id, 0)
        limit = key.rate_limit or ""

        def answer(verdict: str, affordable_tokens: int = 0) -> Verdict:
            return Verdict(
                verdict,
                key.id,
                key.account_id,
                limit,
                available,
                affordable_tokens=affordable_tokens,
            )

        granted = terms.grant(available)
        facts = key_facts(
            key,
            account,
            now,
            month_spend=spend,
            hold_nanos=terms.full_amount if granted is None else granted[1],
            min_hold_nanos=terms.amount(terms.min_output_tokens),
        )
        state = first_row(facts, stored=key.state_at(now)).state
        if state in STANDING:
            return answer(state.value)
        earlier = holds.find(session, hold.request_id)
        if earlier is not None:
            if earlier.key_id != key.id or earlier.request_hash not in (None, hold.request_hash):
                return answer("request_id_conflict")
            return self._held(key, earlier, available, spend)
        if state is RequestRefusal.HOLD_EXCEEDS_AVAILABLE:
            return answer(state.value, affordable_tokens=terms.most_output(available) or 0)
        if state is not KeyState.ACTIVE:
            return answer(state.value)
        if limit and not self.rate_limits.test(limit, key.id):
            return answer("rate_limited")
        if hold.model_id is None:
            return answer("checked")
        if key.allowed_models is not None and hold.model_id not in key.allowed_models:
            return answer("model_not_allowed")
        try:
            row, left = holds.place(
                session,
                key=key,
                hold_id=hold.hold_id,
                model_id=hold.model_id,
                request_id=hold.request_id,
                request_hash=hold.request_hash,
                terms=terms,
                month_spend=spend,
                ttl=hold.expires_at - now,
                now=now,
            )
        except holds.QuotaExceeded:  # a concurrent hold took the rest of the cap
            return answer(KeyState.MONTHLY_QUOTA_EXCEEDED.value)
        except holds.DoesNotFit as short:  # a concurrent hold took (some of) the rest
            available = short.available_nanos
            if short.balance_nanos <= 0 or available <= 0:
                return answer(KeyState.INSUFFICIENT_BALANCE.value)
            return answer(
                RequestRefusal.HOLD_EXCEEDS_AVAILABLE.value,
                affordable_tokens=terms.most_output(available) or 0,
            )
        if limit and not self.rate_limits.hit(limit, key.id):
            # A concurrent request took the last place in the window.
            holds.release(session, [hold.request_id], reason="rate limited", now=now)
            return answer("rate_limited")
        return self._held(key, row, left, spend)

    def _held(self, key: ApiKey, row: holds.Hold, available: int, spend: int) -> Verdict:
        limit = key.rate_limit or ""
        capped = key.monthly_cap_nanos is not None
        return Verdict(
            "held",
            key.id,
            key.account_id,
            limit,
            available,
            row.id,
            row.amount_nanos,
            output_tokens=row.output_tokens or 0,
            rate_window=self.rate_limits.window(limit, key.id) if limit else None,
            monthly_cap_nanos=key.monthly_cap_nanos,
            month_spend_nanos=spend if capped else None,
        )

    def verify(self, key_hash: str, *, now: dt.datetime) -> KeyCheck:
        """The key's state at ``now`` as PostgreSQL has it, counting nothing."""
        key = self._key(key_hash)
        if key is None:
            return KeyCheck("invalid")
        limit = key.rate_limit or ""
        return KeyCheck(
            key.state_at(now).value,
            key.id,
            key.account_id,
            key.allowed_models,
            limit,
            self.rate_limits.window(limit, key.id) if limit else None,
        )
