"""The admin API (``/admin/v1``): operators manage accounts, keys, prices and money.

One module per resource holds its views and the bodies only they use. All of them add their
routes to the one blueprint, ``admin`` (``blueprint``: the admin token check and the audit of
every write), which ``billing.api`` registers.
"""

from __future__ import annotations

# Importing a resource module adds its routes to ``admin``; a tag takes its place in the OpenAPI
# document and the docs UI with its first route, hence this order rather than an alphabetical one.
# isort: off
from billing.api.admin import accounts, keys, ledger, models, gateway_tokens  # noqa: F401
from billing.api.admin import usage, audit_log, webhooks, auto_recharge  # noqa: F401

# isort: on
from billing.api.admin.blueprint import admin

__all__ = ["admin"]
