"""Every table, imported in one place for migrations and schema checks."""

from billing.access import audit, auth
from billing.accounts import accounts, keys, violations
from billing.catalog import catalog
from billing.core.db import Base
from billing.ledger import holds, ledger
from billing.metering import rollups, usage_events
from billing.notify import models
from billing.payments import payments

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
    "models",
    "payments",
    "rollups",
    "usage_events",
    "violations",
]
