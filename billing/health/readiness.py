"""Readiness: may this process take traffic? (``GET /readyz``)

Ready means PostgreSQL answers, its schema is at the migrations' head, Redis answers when one is
configured, and settlement keeps up: the oldest usage event still pending was received less
than ``READY_MAX_SETTLEMENT_LAG_SECONDS`` ago. A check that cannot run fails; none raises.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from functools import cache

import redis
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from billing.core.errors import BillingError
from billing.core.migrate import alembic_config
from billing.metering import settlement

log = logging.getLogger(__name__)


class NotReady(BillingError):
    """At least one readiness check failed; the message names each and why."""

    status = 503
    code = "not_ready"
    type = "server_error"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``detail`` says what was found, in plain words."""

    name: str
    ok: bool
    detail: str


@cache
def script_heads() -> tuple[str, ...]:
    """The head revision(s) of the migrations shipped with this code."""
    return tuple(sorted(ScriptDirectory.from_config(alembic_config("")).get_heads()))


def database_revisions(connection: Connection) -> tuple[str, ...]:
    """The revision(s) the database is at (empty: never migrated)."""
    return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))


def migrations_check(connection: Connection) -> Check:
    """Whether the database's schema is at the head of the migrations."""
    current, heads = database_revisions(connection), script_heads()
    if current == heads:
        return Check("migrations", True, f"at head {', '.join(heads)}")
    found = ", ".join(current) or "no revision (never migrated)"
    return Check("migrations", False, f"database at {found}, code expects {', '.join(heads)}")


def settlement_lag_check(session: Session, *, limit: dt.timedelta, now: dt.datetime) -> Check:
    """Whether the oldest pending usage event is younger than ``limit``."""
    age = settlement.settlement_lag(session, now=now)
    if age is None:
        return Check("settlement_lag", True, "no usage event is waiting for settlement")
    seconds, limit_seconds = int(age.total_seconds()), int(limit.total_seconds())
    detail = f"the oldest pending usage event is {seconds} s old (limit {limit_seconds} s)"
    return Check("settlement_lag", age < limit, detail)


def _failed(name: str, exc: Exception, session: Session | None = None) -> Check:
    log.warning("readiness check %s failed: %s", name, exc)
    if session is not None:
        try:
            session.rollback()  # leave the session usable for the next check
        except Exception:
            log.debug("rollback after a failed check failed too", exc_info=True)
    return Check(name, False, f"unreachable or failing ({type(exc).__name__})")


def check(
    session: Session,
    *,
    redis_client: redis.Redis | None,
    max_settlement_lag: dt.timedelta,
    now: dt.datetime,
) -> list[Check]:
    """Every readiness check, in order; the database's dependants only when it answers."""
    checks: list[Check] = []
    try:
        session.execute(text("SELECT 1"))
        checks.append(Check("database", True, "reachable"))
    except Exception as exc:
        checks.append(_failed("database", exc, session))
    if checks[0].ok:
        try:
            checks.append(migrations_check(session.connection()))
        except Exception as exc:
            checks.append(_failed("migrations", exc, session))
        try:
            checks.append(settlement_lag_check(session, limit=max_settlement_lag, now=now))
        except Exception as exc:
            checks.append(_failed("settlement_lag", exc, session))
    if redis_client is None:
        checks.append(Check("redis", True, "not configured (embedded default)"))
    else:
        try:
            redis_client.ping()
            checks.append(Check("redis", True, "reachable"))
        except Exception as exc:
            checks.append(_failed("redis", exc))
    return checks


def require_ready(
    session: Session,
    *,
    redis_client: redis.Redis | None,
    max_settlement_lag: dt.timedelta,
    now: dt.datetime,
) -> list[Check]:
    """The readiness checks when all pass; raises NotReady naming each failing one otherwise."""
    checks = check(
        session, redis_client=redis_client, max_settlement_lag=max_settlement_lag, now=now
    )
    failing = [item for item in checks if not item.ok]
    if failing:
        reasons = "; ".join(f"{item.name}: {item.detail}" for item in failing)
        raise NotReady(f"Not ready: {reasons}.")
    return checks
