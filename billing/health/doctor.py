"""``billing doctor``: what is wrong with this deployment, in plain words, and what to do.

Each check looks at one thing an operator can get wrong and no test of ours can see: the
PostgreSQL server's configuration, the schema, the data a first deployment needs, Redis's
eviction policy, secrets and Stripe settings, the clock. A check finds either nothing or one
:class:`Finding`; none raises, and none changes anything.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.orm import Session

from billing.catalog import catalog
from billing.core.settings import Settings
from billing.health.readiness import database_revisions, script_heads
from billing.notify.models import WebhookEndpoint

# More than this between our clock and PostgreSQL's, and holds, expiries, rate-limit windows
# and the occurred_at bounds disagree with the timestamps the database writes.
MAX_CLOCK_SKEW = dt.timedelta(seconds=5)

Clock = Callable[[], dt.datetime]


@dataclass(frozen=True)
class Finding:
    """One problem: ``check`` names it, ``problem`` says what is wrong, ``fix`` what to do."""

    check: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.check}: {self.problem} Fix: {self.fix}"


def diagnose(
    settings: Settings, engine: Engine, redis_client: redis.Redis | None, *, clock: Clock
) -> list[Finding]:
    """Every problem found with the deployment these settings and connections describe."""
    findings = database_findings(engine, clock=clock)
    if redis_client is not None:
        findings += redis_findings(redis_client)
    findings += settings_findings(settings)
    return findings


def database_findings(engine: Engine, *, clock: Clock) -> list[Finding]:
    """The server's configuration and clock, the schema, and the data a deployment needs."""
    path = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and path and not Path(path).exists():
        # Connecting would create an empty file; the doctor changes nothing.
        return [
            Finding(
                "database",
                f"the SQLite database {path} does not exist.",
                "run `billing db upgrade`, or check DATABASE_URL and DATA_DIR.",
            )
        ]
    try:
        with engine.connect() as connection:
            return _database_findings(connection, clock=clock)
    except Exception as exc:
        return [
            Finding(
                "database",
                f"cannot use the database at {engine.url.render_as_string()}"
                f" ({type(exc).__name__}: {_first_line(exc)}).",
                "check DATABASE_URL and that the server is running and accepts this user.",
            )
        ]


def _database_findings(connection: Connection, *, clock: Clock) -> list[Finding]:
    findings = []
    if connection.dialect.name == "postgresql":
        findings += _autovacuum(connection)
        findings += _clock_skew(connection, clock=clock)
    current, heads = database_revisions(connection), script_heads()
    if current != heads:
        found = ", ".join(current) or "no revision: it was never migrated"
        findings.append(
            Finding(
                "migrations",
                f"the database schema is not at the code's head ({found};"
                f" the code expects {', '.join(heads)}).",
                "run `billing db upgrade` (the price table and webhook endpoints are checked"
                " once the schema is at head).",
            )
        )
        return findings
    with Session(bind=connection) as session:
        return findings + _data_findings(session)


def _data_findings(session: Session) -> list[Finding]:
    findings = []
    if not catalog.has_models(session):
        findings.append(
            Finding(
                "prices",
                "the price table is empty: every usage event is parked as unpriced and no"
                " model can be authorized.",
                "run `billing prices import` (the shipped table) or POST /admin/v1/models.",
            )
        )
    endpoint = select(WebhookEndpoint.id).where(WebhookEndpoint.disabled_at.is_(None)).limit(1)
    if session.scalar(endpoint) is None:
        findings.append(
            Finding(
                "webhooks",
                "no gateway webhook endpoint is registered: gateways are not told when a key"
                " is blocked or unblocked.",
                "register the gateway's URL with POST /admin/v1/webhook-endpoints.",
            )
        )
    return findings


def _autovacuum(connection: Connection) -> list[Finding]:
    if connection.scalar(text("SHOW autovacuum")) == "on":
        return []
    return [
        Finding(
            "autovacuum",
            "PostgreSQL autovacuum is off: the dead rows that settlement, holds and webhook"
            " deliveries leave behind are never reclaimed, so tables and indexes bloat and"
            " planner statistics go stale.",
            "set `autovacuum = on` in postgresql.conf (or `ALTER SYSTEM SET autovacuum = on;"
            " SELECT pg_reload_conf();` as a superuser).",
        )
    ]


def _clock_skew(connection: Connection, *, clock: Clock) -> list[Finding]:
    before = time.monotonic()
    local = clock()
    database = connection.scalar(text("SELECT now()"))
    apart = abs(database - local)
    # Our reading is taken just before the query; allow for the round trip.
    if apart - dt.timedelta(seconds=time.monotonic() - before) <= MAX_CLOCK_SKEW:
        return []
    return [
        Finding(
            "clock",
            f"this host's clock and PostgreSQL's differ by {apart.total_seconds():.0f} s"
            f" (more than {MAX_CLOCK_SKEW.total_seconds():.0f} s): hold expiry, rate-limit"
            " windows and the bounds on occurred_at disagree with the database's timestamps.",
            "synchronise both hosts' clocks with NTP (chrony or systemd-timesyncd).",
        )
    ]


def redis_findings(client: redis.Redis) -> list[Finding]:
    """Redis answers, and keeps our keys rather than evicting them."""
    try:
        memory = client.info("memory")
    except Exception as exc:
        return [
            Finding(
                "redis",
                f"cannot reach Redis ({type(exc).__name__}: {_first_line(exc)}).",
                "check REDIS_URL and that the server is running.",
            )
        ]
    problem = eviction_problem(
        int(memory.get("maxmemory", 0)), str(memory.get("maxmemory_policy", ""))
    )
    return [] if problem is None else [Finding("redis", problem, _EVICTION_FIX)]


_EVICTION_FIX = (
    "set `maxmemory-policy noeviction` (redis.conf or CONFIG SET), and give Redis the memory"
    " it needs."
)


def eviction_problem(maxmemory: int, policy: str) -> str | None:
    """What is wrong with a Redis that has ``maxmemory`` bytes (0: no limit) and evicts by
    ``policy``, or None when it never evicts a key.

    The queued Celery tasks, the holds placed on the hot path and the rate-limit windows live
    in Redis; an evicting policy drops them silently when memory runs short. Without a limit
    Redis does not evict, but the policy is still wrong: setting a limit later would start it.
    """
    if policy == "noeviction":
        return None
    if maxmemory > 0:
        return (
            f"Redis evicts keys when it reaches maxmemory ({maxmemory} bytes) by"
            f" maxmemory-policy {policy}: queued tasks, holds and rate-limit windows would"
            " silently disappear."
        )
    return (
        f"Redis's maxmemory-policy is {policy}: once a maxmemory limit is set it will evict"
        " queued tasks, holds and rate-limit windows."
    )


STRIPE_TOGETHER: dict[str, Callable[[Settings], bool]] = {
    "STRIPE_SECRET_KEY": lambda s: s.stripe_secret_key is not None,
    "STRIPE_PUBLISHABLE_KEY": lambda s: s.stripe_publishable_key is not None,
    "STRIPE_WEBHOOK_SECRET": lambda s: s.stripe_webhook_secret is not None,
}


def settings_findings(settings: Settings) -> list[Finding]:
    """Secrets and Stripe settings that are missing or do not belong together."""
    findings = []
    if settings.secret_key is None and not settings.embedded_default:
        findings.append(
            Finding(
                "secret_key",
                "SECRET_KEY is not set: each host generates its own into DATA_DIR/secret_key,"
                " so API keys and tokens made on one are refused by another, and a lost"
                " DATA_DIR invalidates every key.",
                "set SECRET_KEY to one long random value shared by the API, workers and beat"
                " (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`).",
            )
        )
    findings += stripe_findings(settings)
    return findings


def stripe_findings(settings: Settings) -> list[Finding]:
    """Stripe is either not configured at all or configured with the settings it needs
    together, all in one mode (test or live)."""
    present = {name for name, is_set in STRIPE_TOGETHER.items() if is_set(settings)}
    if not present:
        if settings.stripe_api_base != Settings.model_fields["stripe_api_base"].default:
            return [
                Finding(
                    "stripe",
                    "STRIPE_API_BASE is set but no Stripe key is: top-ups are off.",
                    f"set {', '.join(STRIPE_TOGETHER)}, or unset STRIPE_API_BASE.",
                )
            ]
        return []
    missing = [name for name in STRIPE_TOGETHER if name not in present]
    if missing:
        return [
            Finding(
                "stripe",
                f"Stripe is half configured: {', '.join(sorted(present))} set but"
                f" {', '.join(missing)} not, so top-ups"
                f" {'cannot be credited' if 'STRIPE_WEBHOOK_SECRET' in missing else 'fail'}.",
                f"set {', '.join(missing)} (from the Stripe dashboard), or unset all STRIPE_*"
                " to turn top-ups off.",
            )
        ]
    secret = settings.stripe_secret_key.get_secret_value() if settings.stripe_secret_key else ""
    modes = {_stripe_mode(secret), _stripe_mode(settings.stripe_publishable_key or "")} - {None}
    if len(modes) > 1:
        return [
            Finding(
                "stripe",
                "STRIPE_SECRET_KEY and STRIPE_PUBLISHABLE_KEY are from different modes"
                " (one test, one live): the card form and the server talk to different"
                " Stripe accounts.",
                "use the secret and publishable keys of the same mode.",
            )
        ]
    return []


def _stripe_mode(key: str) -> str | None:
    # sk_test_..., rk_live_..., pk_test_...: the mode follows the two-letter kind.
    kind, _, rest = key.partition("_")
    mode = rest.partition("_")[0]
    return mode if len(kind) == 2 and mode in ("test", "live") else None


def _first_line(exc: Exception) -> str:
    # SQLAlchemy wraps the driver's error in a longer message; the driver's says it plainly.
    cause = getattr(exc, "orig", None) or exc
    return " ".join(str(cause).split())
