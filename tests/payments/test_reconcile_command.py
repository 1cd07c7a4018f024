"""`billing stripe reconcile` against a localstripe process: the beat's reconciliation on
demand, printing each payment it credited, and refusing to run without Stripe settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import stripe
from click.testing import CliRunner, Result
from sqlalchemy import Engine

from billing.accounts.accounts import Account, create_account
from billing.cli import main
from billing.core.db import utcnow
from billing.payments.customers import ensure_customer
from billing.runtime import Runtime
from tests.conftest import SECRET_KEY, TEST_DATABASE_URL
from tests.localstripe import SECRET_KEY as STRIPE_SECRET_KEY
from tests.payments.conftest import pay_on_localstripe


@pytest.fixture
def env(localstripe_url: str, tmp_path: Path) -> dict[str, str | None]:
    """The command's environment: the tests' database, Stripe at localstripe, no Redis."""
    return {
        "DATABASE_URL": TEST_DATABASE_URL,
        "REDIS_URL": None,
        "SECRET_KEY": SECRET_KEY,
        "DATA_DIR": str(tmp_path),
        "STRIPE_API_BASE": localstripe_url,
        "STRIPE_SECRET_KEY": STRIPE_SECRET_KEY,
        "STRIPE_PUBLISHABLE_KEY": None,
        "STRIPE_WEBHOOK_SECRET": None,
    }


def reconcile(env: dict[str, str | None]) -> Result:
    return CliRunner().invoke(main, ["stripe", "reconcile"], env=env, catch_exceptions=False)


def test_the_command_credits_an_unannounced_payment_once_and_says_so(
    runtime: Runtime, committed: Engine, sdk: stripe.StripeClient, env: dict[str, str | None]
) -> None:
    # Committed, so that the command's own connection sees the account.
    with runtime.transaction() as session:
        account = create_account(session, name="Reconciled", email=None, now=utcnow())
        customer = ensure_customer(session, account.id, settings=runtime.settings, now=utcnow())
    intent = sdk.v1.payment_intents.create(
        params={
            "amount": 1234,
            "currency": "usd",
            "customer": customer,
            "metadata": {"account_id": account.id, "payment_id": "pay_reconcile_cli_1"},
        }
    )
    pay_on_localstripe(sdk, intent.id)

    first = reconcile(env)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [
        f"credited {intent.id}: 12.340000000 USD to account {account.id}"
        " (payment pay_reconcile_cli_1)",
        "1 payment(s) credited",
    ]
    again = reconcile(env)
    assert (again.exit_code, again.stdout) == (0, "nothing to reconcile\n")
    with runtime.sessions() as session:
        credited = session.get(Account, account.id)
        assert credited is not None and credited.balance_nanos == 12_340_000_000


def test_the_command_fails_when_stripe_is_not_configured(env: dict[str, str | None]) -> None:
    result = reconcile(env | {"STRIPE_SECRET_KEY": None})
    assert result.exit_code == 1
    assert "STRIPE_SECRET_KEY is not set" in result.output
