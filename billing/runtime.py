"""What every request, command and task shares: settings, the database, Redis, and the effects
that must follow a commit (never precede it).

Domain code marks what a transaction did (``billing.core.effects``: keys whose state changed, usage
waiting to be settled); after the commit, :meth:`Runtime.after_commit` carries out
the effects: the Redis mirror is updated and settlement is triggered. If an effect is lost (a
process dies between commit and effect), the periodic sweep and mirror sync catch up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis
from flask import current_app
from limits import parse as parse_rate_limit
from limits.storage import MemoryStorage, RedisStorage, Storage
from sqlalchemy import Engine
from sqlalchemy.orm import Session, object_session, sessionmaker

from billing.access.auth import ActorCache
from billing.access.failures import AuthFailures
from billing.accounts.accounts import Account, Funds
from billing.core import effects, metrics
from billing.core.db import transaction, utcnow
from billing.core.settings import Settings
from billing.enforcement import mirror
from billing.enforcement.authorize import Authorizer
from billing.enforcement.hotpath import HotPath
from billing.enforcement.rate_limits import RateLimits
from billing.ledger import holds
from billing.metering import reconcile, settlement
from billing.notify import delivery

log = logging.getLogger(__name__)

SETTLE_FLAG = "billing:settle:scheduled"
SETTLE_TASK = "workers.tasks.settle_usage"
# A trigger coalesces the ingests of this many seconds into one settlement task.
SETTLE_FLAG_TTL = 2
WEBHOOKS_TASK = "workers.tasks.deliver_webhooks"
# The queue of WEBHOOKS_TASK (billing.app routes it there), so receivers never delay settlement.
WEBHOOKS_QUEUE = "webhooks"
# How long Runtime.funds waits for a committed settlement's copy to reach Redis (seconds).
FUNDS_SNAPSHOT_WAIT = 0.5


@dataclass
class Runtime:
    """Settings and connections of one process."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: redis.Redis | None = None
    celery: Any = field(default=None, repr=False)
    # Read-only sessions on the streaming replica (DATABASE_READ_URL), for reads that may lag
    # (billing.http.context.report_session); None: there is none, reports read the primary.
    replica_sessions: sessionmaker[Session] | None = None

    @cached_property
    def gateway_actors(self) -> ActorCache:
        """The gateway tokens this process has recently accepted (``auth.ActorCache``)."""
        return ActorCache()

    @cached_property
    def auth_failures(self) -> AuthFailures:
        """The failed authentications per client address (``billing.access.failures``)."""
        storage: Storage = MemoryStorage()
        if self.redis is not None:
            storage = RedisStorage(
                self.settings.redis_url or "",
                connection_pool=self.redis.connection_pool,
                key_prefix="billing-auth",
                wrap_exceptions=True,
            )
        return AuthFailures(storage, parse_rate_limit(self.settings.auth_failure_rate_limit))

    @cached_property
    def hotpath(self) -> HotPath | None:
        """The Redis side of authorize, or None on the embedded default."""
        return None if self.redis is None else HotPath(self.redis)

    @cached_property
    def authorizer(self) -> Authorizer:
        """Authorize for this process (billing.enforcement.authorize)."""
        settings = self.settings
        memory = RateLimits(MemoryStorage())
        return Authorizer(
            hmac_key=settings.hmac_key,
            hold_ttl=dt.timedelta(seconds=settings.hold_ttl_seconds),
            default_max_output_tokens=settings.hold_default_max_output_tokens,
            min_output_tokens=settings.hold_min_output_tokens,
            hotpath=self.hotpath,
            rate_limits=(
                memory
                if self.redis is None
                else RateLimits(
                    RedisStorage(
                        settings.redis_url or "", connection_pool=self.redis.connection_pool
                    )
                )
            ),
            # With Redis down, each process limits the requests it authorizes itself.
            fallback_rate_limits=memory,
            fall_back_to_postgres=settings.authorize_when_redis_down == "postgres",
        )

    def funds(self, account: Account) -> Funds:
        """The account's balance, open holds and available balance as authorize sees them,
        counting the holds placed through Redis when it is reachable.

        Redis's holds are released in the same script call that copies the balance their
        settlement produced, after that settlement commits. So the balance and Redis's holds
        are read as one snapshot: Redis first (its balance version and holds, together), then
        the account row; if the row is newer than Redis's copy, its settlement's copy is
        still on its way (or was lost, which the sweep repairs) and both are read again.
        Reading the row first would pair a balance from before a settlement with holds from
        after it (and the other way round, the holds of requests already charged).
        """
        if self.hotpath is None:
            return account.funds()
        session = object_session(account)
        deadline = time.monotonic() + FUNDS_SNAPSHOT_WAIT
        try:
            while True:
                copy = self.hotpath.account_copy(account.id)
                if session is not None:
                    session.refresh(account)
                if copy is None or copy[0] >= account.balance_version:
                    break
                if time.monotonic() >= deadline:
                    log.warning(
                        "account %s: Redis's balance is behind PostgreSQL's; its holds may"
                        " include requests already charged until the sweep copies it",
                        account.id,
                    )
                    break
                time.sleep(0.005)
        except redis.RedisError:
            log.warning("Redis unavailable: held amounts shown without its holds")
            return account.funds()
        return account.funds(redis_held_nanos=0 if copy is None else copy[1])

    def hold_keys(self, session: Session, request_ids: list[str]) -> dict[str, str]:
        """The key of each of these requests that has an open hold, wherever it was placed
        (Redis's holds are left out while it is unreachable)."""
        found = holds.open_hold_keys(session, request_ids)
        if self.hotpath is not None:
            try:
                found |= self.hotpath.hold_keys(request_ids)
            except redis.RedisError:
                log.warning("Redis unavailable: usage not checked against its holds")
        return found

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session committed at the end of the block, followed by its after-commit effects."""
        with transaction(self.sessions) as session:
            yield session
        self.after_commit(session)

    def after_commit(self, session: Session) -> None:
        """Carry out what the committed transaction asked for."""
        marks = effects.take(session)
        for state in marks.new_states:
            metrics.KEY_STATE_CHANGES.labels(state=state).inc()
        changed = marks.changed_keys
        if changed and self.redis is not None:
            try:
                with self.sessions() as reader:
                    mirror.publish(reader, self.redis, changed)
            except redis.RedisError:
                log.warning(
                    "Redis unavailable: %d key states wait for the next mirror sync", len(changed)
                )
        if (marks.accounts or marks.settled_requests) and self.hotpath is not None:
            try:
                self.hotpath.publish(marks.accounts, marks.settled_requests)
            except redis.RedisError:
                # Balances are copied again by the sweep; unreleased holds expire.
                log.warning(
                    "Redis unavailable: %d balances wait for the sweep", len(marks.accounts)
                )
        usage_pending = marks.usage_pending
        if marks.prices_changed:
            with self.transaction() as released:
                usage_pending = settlement.release_unpriced(released) > 0 or usage_pending
        if usage_pending:
            self.trigger_settlement()
        if marks.webhooks_pending:
            self.trigger_webhooks()

    def trigger_settlement(self) -> None:
        """Have pending usage settled soon: in-process when embedded, else by a coalesced task."""
        if self.redis is None:
            try:
                self.settle_pending()
            except Exception:
                # Embedded default: the events are committed; the next trigger settles them.
                log.exception("in-process settlement failed")
            return
        try:
            if self.redis.set(SETTLE_FLAG, 1, nx=True, ex=SETTLE_FLAG_TTL):
                self.celery.send_task(SETTLE_TASK, retry=False)
        except Exception:
            log.warning(
                "could not trigger settlement; the periodic sweep will settle", exc_info=True
            )

    def settle_pending(self, *, limit: int = settlement.BATCH_SIZE) -> int:
        """Settle batches until none is pending; returns the number of events claimed."""
        if self.redis is not None:
            # Cleared before draining: an ingest that commits after this point triggers anew.
            self.redis.delete(SETTLE_FLAG)
        total = 0
        while True:
            with self.transaction() as session:
                result = settlement.settle_batch(
                    session,
                    low_balance_nanos=self.settings.balance_low_threshold,
                    now=utcnow(),
                    limit=limit,
                )
            if result.settled:
                metrics.SETTLED_EVENTS.inc(result.settled)
                metrics.CHARGED_NANOS.inc(result.charged_nanos)
            if total == 0 and result.claimed == limit and self.celery is not None and self.redis:
                # A backlog: ask another worker to drain beside this one (SKIP LOCKED keeps
                # them apart). Each drain asks once, so helpers never outnumber the backlog.
                self.celery.send_task(SETTLE_TASK, retry=False)
            total += result.claimed
            if result.claimed < limit:
                return total

    def sync_mirror(self) -> int:
        """Bring the Redis copies (key states, balances) up to date; returns the keys written."""
        if self.redis is None or self.hotpath is None:
            return 0
        with self.transaction() as session:
            now = utcnow()
            self.hotpath.sync_balances(session, now=now)
            return mirror.sync(session, self.redis, now=now)

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only transaction that sees one snapshot of the database throughout
        (REPEATABLE READ on PostgreSQL), rolled back at the end of the block."""
        with self.sessions() as session:
            if self.engine.dialect.name == "postgresql":
                session.connection(
                    execution_options={
                        "isolation_level": "REPEATABLE READ",
                        "postgresql_readonly": True,
                    }
                )
            yield session

    def reconcile(self, *, full: bool = False, sample: int = 0) -> reconcile.Verification:
        """Verify the money invariants on one snapshot (``billing.metering.reconcile``: what was
        settled since the watermark, or ``full``y, and ``sample`` random events), then move the
        watermark if all was well."""
        now = utcnow()
        with self.snapshot() as session:
            verification = reconcile.verify(session, now=now, full=full, sample=sample)
        if not verification.clean:
            return verification
        # A transaction of its own: the snapshot's could not update a row that another run
        # moved meanwhile (the compare and set then just finds it moved).
        with self.transaction() as session:
            advanced = reconcile.advance(session, verification, now=now)
        return dataclasses.replace(verification, advanced=advanced)

    def expire_holds(self, *, now: dt.datetime | None = None) -> int:
        """Release the holds past their expiry at ``now`` (default: the present), in PostgreSQL
        and Redis; returns how many."""
        now = now or utcnow()
        with self.transaction() as session:
            expired = holds.expire(session, now=now)
        if self.hotpath is not None:
            expired += self.hotpath.expire(now=now)
        return expired

    # Webhooks (billing.notify.delivery)

    def trigger_webhooks(self) -> None:
        """Have queued webhook deliveries sent now by a worker.

        Embedded (no Redis, no worker) nothing is sent from here, so that no request waits on a
        receiver: `billing webhooks deliver` sends them.
        """
        if self.redis is None:
            return
        try:
            self.celery.send_task(WEBHOOKS_TASK, queue=WEBHOOKS_QUEUE, retry=False)
        except Exception:
            log.warning("could not trigger webhook delivery; beat sends it shortly", exc_info=True)

    def deliver_webhooks(self) -> int:
        """Send the due webhook deliveries (new ones and retries); returns the attempts made."""
        settings = self.settings
        schedule = settings.webhook_retry_delays
        return delivery.deliver_due(
            self.sessions,
            hmac_key=settings.hmac_key,
            schedule=delivery.RETRY_SCHEDULE if schedule is None else schedule,
            timeout=settings.webhook_timeout_seconds,
            allow_private=settings.webhook_allow_private_urls,
            on_outcome=lambda outcome: metrics.WEBHOOK_DELIVERIES.labels(outcome=outcome).inc(),
        )


def current_runtime() -> Runtime:
    """The Runtime of the app in context (a request, a CLI command or a Celery task)."""
    runtime: Runtime = current_app.extensions["billing"]
    return runtime
