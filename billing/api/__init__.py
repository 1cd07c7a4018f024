"""The HTTP edge: blueprints, security schemes and the error renderer."""

from __future__ import annotations

from typing import Any

from flask_openapi3 import OpenAPI
from flask_openapi3.models import SecurityScheme

from billing.api import gateway_keys  # noqa: F401  # importing it adds its routes to ``gateway``
from billing.api.admin import admin
from billing.api.customer import customer
from billing.api.gateway import gateway
from billing.api.ops import ops, register_docs
from billing.api.stripe_webhook import stripe_webhook
from billing.http.errors import register_error_handlers

SECURITY_SCHEMES: dict[str, SecurityScheme | dict[str, Any]] = {
    "admin": SecurityScheme(
        type="http",
        scheme="bearer",
        description="An admin token (`BILLING_ADMIN_TOKEN` or `billing admin-token create`).",
    ),
    "gateway": SecurityScheme(
        type="http",
        scheme="bearer",
        description="A gateway token (`BILLING_GATEWAY_TOKEN` or `billing gateway-token create`).",
    ),
    "customer": SecurityScheme(
        type="http", scheme="bearer", description="A customer API key, `sk-...`."
    ),
}


def register(app: OpenAPI) -> None:
    """Attach every blueprint and the error handlers to ``app``."""
    register_error_handlers(app)
    app.register_api(ops)
    app.register_api(admin)
    app.register_api(customer)
    app.register_api(gateway)
    app.register_api(stripe_webhook)
    register_docs(app)
