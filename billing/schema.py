"""Every table, imported in one place for migrations and schema checks."""

from billing import (
    accounts,
    audit,
    auth,
    catalog,
    holds,
    keys,
    ledger,
    payments,
    rollups,
    usage_events,
    violations,
    webhooks,
)
from billing.db import Base

metadata = Base.metadata
__all__ = [
    "accounts",
    "audit",
    "auth",
    "catalog",
    "holds",
    "keys",
    "ledger",
    "metadata",
    "payments",
    "rollups",
    "usage_events",
    "violations",
    "webhooks",
]
