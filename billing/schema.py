"""Every table, imported in one place for migrations and schema checks."""

from billing.access import audit, auth
from billing.accounts import accounts, keys, page_sessions, rollups, violations
from billing.catalog import catalog
from billing.core.db import Base
from billing.ledger import checkpoints, holds, ledger
from billing.metering import usage_events
from billing.notify import models as webhooks
from billing.payments import models as payments

metadata = Base.metadata
__all__ = [
    "accounts",
    "audit",
    "auth",
    "catalog",
    "checkpoints",
    "holds",
    "keys",
    "ledger",
    "metadata",
    "page_sessions",
    "payments",
    "rollups",
    "usage_events",
    "violations",
    "webhooks",
]
