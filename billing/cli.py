"""The ``billing`` command line for operators. Each command parses, calls the domain, prints."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import redis
from pydantic import ValidationError
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from billing.access.auth import Role, ServiceToken, create_token
from billing.app import create_app
from billing.catalog import catalog
from billing.core.db import make_engine, utcnow
from billing.core.errors import BillingError
from billing.core.migrate import upgrade
from billing.core.money import format_usd
from billing.core.settings import Settings
from billing.enforcement import mirror
from billing.health import doctor as checkup
from billing.payments.models import Payment
from billing.payments.reconcile import reconcile as reconcile_payments
from billing.payments.stripe_api import cents_to_nanos
from billing.runtime import Runtime

T = TypeVar("T")


def _settings() -> Settings:
    """The settings of the environment; exits 1 naming each one refused and how to fix it."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            name = ".".join(str(part) for part in error["loc"]).upper()
            message = str(error["msg"]).removeprefix("Value error, ")
            # Our own validators name the setting in the message already.
            click.echo(
                f"settings: {message}" if name in message else f"settings: {name}: {message}"
            )
        click.echo("Fix: correct the settings in the environment (README, Configuration).")
        sys.exit(1)


def _runtime() -> Runtime:
    runtime: Runtime = create_app(_settings()).extensions["billing"]
    return runtime


@click.group()
def main() -> None:
    """Operate the billing service (settings come from the environment, see README)."""


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration, then load the shipped price table into an empty database.

    The price table is loaded only while the database has no models (as `prices import
    --if-empty` does), so a new deployment can bill at once and an operator's prices are never
    touched.
    """
    _migrate(_runtime())


def _migrate(runtime: Runtime) -> None:
    """Migrate to the latest schema and load the shipped price table into an empty database."""
    runtime.settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(runtime.settings.sqlalchemy_url)
    click.echo("database is at the latest schema")
    with runtime.transaction() as session:
        if not catalog.has_models(session):
            added = catalog.import_prices(session, catalog.default_price_file(), now=utcnow())
            click.echo(f"loaded the default price table ({len(added)} price version(s))")


@main.group()
def prices() -> None:
    """The price table."""


@prices.command("import")
@click.argument(
    "file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False
)
@click.option("--if-empty", is_flag=True, help="Only import into a database with no models yet.")
def prices_import(file: Path | None, if_empty: bool) -> None:
    """Import a price file (default: the shipped table of the seed models)."""
    with _runtime().transaction() as session:
        if if_empty and catalog.has_models(session):
            click.echo("price table already loaded; nothing imported")
            return
        added = _or_exit(
            lambda: catalog.import_prices(
                session, file or catalog.default_price_file(), now=utcnow()
            )
        )
        for version in added:
            click.echo(f"added price version {version.id} of {version.model_id}")
        click.echo(f"{len(added)} price version(s) added")


@main.command()
@click.option(
    "--full",
    is_flag=True,
    help="Verify the whole history, not only what was settled since the last clean run.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    metavar="N",
    help="Also re-price N settled events drawn at random from the whole history.",
)
def reconcile(full: bool, sample: int | None) -> None:
    """Prove the money invariants on live data; exit 1 on any drift.

    Every balance equals the sum of its ledger entries; every charge settled since the last
    clean run (the whole history with --full) equals an independent recomputation from its raw
    report and the price table, as does every usage entry the sum of its events. A clean run
    moves the watermark it starts from next time.
    """
    result = _runtime().reconcile(full=full, sample=sample or 0)
    for item in result.drift:
        click.echo(f"DRIFT {item}", err=True)
    if result.drift:
        sys.exit(1)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    scope = "ever" if result.since is None else f"since {result.since:{stamp}}"
    summary = [
        "ok: every balance equals the sum of its entries",
        f"the {result.costs.events} event(s) settled {scope} re-priced, and"
        f" {result.costs.entries} usage entries checked against them",
    ]
    if sample:
        summary.append(f"{result.sampled.events} event(s) drawn at random re-priced")
    if result.advanced:
        summary.append(f"verified through {result.closed:{stamp}}")
    click.echo("; ".join(summary))


@main.command("redis-rebuild")
def redis_rebuild() -> None:
    """Rebuild the Redis mirror of key states from PostgreSQL."""
    runtime = _runtime()
    if runtime.redis is None:
        raise click.ClickException("REDIS_URL is not set: there is no mirror to rebuild.")
    with runtime.transaction() as session:
        count = mirror.rebuild(session, runtime.redis)
    click.echo(f"mirrored the state of {count} key(s)")


@main.group("webhooks")
def webhooks_group() -> None:
    """Gateway webhooks."""


@webhooks_group.command("deliver")
@click.option(
    "--watch", is_flag=True, help="Keep going, every 5 seconds (what beat does with workers)."
)
def webhooks_deliver(watch: bool) -> None:
    """Send the due webhook deliveries, new ones and retries.

    With workers (REDIS_URL set) they do this themselves; on the embedded default nothing is
    sent from a request, so run this (with --watch to keep sending retries).
    """
    runtime = _runtime()
    while True:
        made = runtime.deliver_webhooks()
        if made or not watch:
            click.echo(f"{made} webhook attempt(s) made")
        if not watch:
            return
        time.sleep(5)


@main.command()
def doctor() -> None:
    """Check this deployment and say what is wrong and what to do; exit 1 if anything is.

    PostgreSQL's autovacuum and clock, the schema, the price table, webhook endpoints, Redis's
    eviction policy, SECRET_KEY and the Stripe settings (README, "billing doctor").
    """
    settings = _settings()
    # Not the app: building it would generate the very SECRET_KEY file this may warn about.
    client = None
    if settings.redis_url:
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
    engine = make_engine(settings.sqlalchemy_url)
    try:
        findings = checkup.diagnose(settings, engine, client, clock=utcnow)
    finally:
        engine.dispose()
    for finding in findings:
        click.echo(str(finding))
    if findings:
        click.echo(f"{len(findings)} problem(s) found", err=True)
        sys.exit(1)
    click.echo("all checks passed")


@main.group("stripe")
def stripe_group() -> None:
    """Stripe payments."""


@stripe_group.command("reconcile")
def stripe_reconcile() -> None:
    """Credit recent succeeded Stripe payments that no webhook credited (what beat does every
    10 minutes); exit 1 if Stripe is not configured or cannot be reached."""
    runtime = _runtime()
    with runtime.transaction() as session:
        credited = _or_exit(
            lambda: reconcile_payments(session, settings=runtime.settings, now=utcnow())
        )
        payments = session.scalars(
            select(Payment).where(
                or_(
                    Payment.payment_intent_id.in_(credited),
                    Payment.checkout_session_id.in_(credited),
                )
            )
        ).all()
    by_stripe_id = {
        stripe_id: payment
        for payment in payments
        for stripe_id in (payment.payment_intent_id, payment.checkout_session_id)
        if stripe_id
    }
    for stripe_id in credited:
        payment = by_stripe_id.get(stripe_id)
        if payment is None:
            click.echo(f"credited {stripe_id}")
            continue
        click.echo(
            f"credited {stripe_id}: {format_usd(cents_to_nanos(payment.amount_cents))} USD"
            f" to account {payment.account_id} (payment {payment.id})"
        )
    click.echo(f"{len(credited)} payment(s) credited" if credited else "nothing to reconcile")


def _token_command(role: Role) -> click.Command:
    @click.command(
        "create", help=f"Create a {role} token and print it (it is shown only this once)."
    )
    @click.option("--name", required=True, help="Who or what the token is for.")
    def create(name: str) -> None:
        runtime = _runtime()
        with runtime.transaction() as session:
            token, secret = _or_exit(
                lambda: create_token(
                    session, role=role, name=name, hmac_key=runtime.settings.hmac_key, now=utcnow()
                )
            )
        click.echo(
            f"created {role} token {token.id} ({name}); store it now, it is not shown again:",
            err=True,
        )
        click.echo(secret)

    return create


@main.group("admin-token")
def admin_token() -> None:
    """Admin API tokens."""


@main.group("gateway-token")
def gateway_token() -> None:
    """Gateway API tokens."""


admin_token.add_command(_token_command(Role.ADMIN))
gateway_token.add_command(_token_command(Role.GATEWAY))


@main.command()
@click.option("--workers", default=1, show_default=True, help="gunicorn worker processes.")
@click.option("--threads", default=8, show_default=True, help="Threads per worker.")
def serve(workers: int, threads: int) -> None:
    """Migrate, load the default price table into an empty database, and serve the API.

    Without BILLING_ADMIN_TOKEN and with no admin token yet, a first admin token is created and
    written to DATA_DIR/admin_token (readable only by you) for scripts and the README walk-through.
    """
    runtime = _runtime()
    settings = runtime.settings
    _migrate(runtime)
    if settings.billing_admin_token is None:
        with runtime.transaction() as session:
            _first_admin_token(session, runtime, settings.data_dir / "admin_token")
    bind = f"127.0.0.1:{settings.port}"
    click.echo(f"serving on http://{bind} (API docs at http://{bind}/docs/swagger)")
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    args = [gunicorn, "--bind", bind, "--workers", str(workers), "--threads", str(threads)]
    os.execv(gunicorn, [*args, "--access-logfile", "-", "billing.wsgi:app"])  # noqa: S606


def _first_admin_token(session: Session, runtime: Runtime, path: Path) -> None:
    if session.scalar(select(ServiceToken.id).where(ServiceToken.role == Role.ADMIN).limit(1)):
        return
    _, secret = create_token(
        session, role=Role.ADMIN, name="initial", hmac_key=runtime.settings.hmac_key, now=utcnow()
    )
    path.write_text(secret + "\n")
    path.chmod(0o600)
    click.echo(f"created the first admin token; it is in {path}")


def _or_exit(action: Callable[[], T]) -> T:
    try:
        return action()
    except BillingError as exc:
        raise click.ClickException(exc.message) from None
